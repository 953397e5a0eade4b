"""The analysis of a served load (`kvscope serve`: continuous batching over a paged KV cache): its records read and
checked (`records`), the summary row (`summary`), prefill interference on decode tokens (`interference`), each
request's share of the GPU (`request_cost`), the "why" sentences (`explain`), the capacity planner set against the
measured load (`planner`), and a profiled load's iterations as Nsight Systems saw them (`iterations_nsys`).
Torch-free, like the rest of `kvscope.analysis`."""
