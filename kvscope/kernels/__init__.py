"""Hand-written CUDA kernels (CUDA C++ sources compiled at run time), each with a PyTorch reference."""
