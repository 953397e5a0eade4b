"""Hand-written CUDA kernels, each with a PyTorch reference: sources in `cuda/`, built ahead of time by the root
CMakeLists.txt or compiled with NVRTC, loaded and launched through CuPy (`loader.py`, `launch.py`)."""
