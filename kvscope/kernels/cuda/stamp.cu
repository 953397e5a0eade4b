// kvscope_stamp: one thread writes the global timer (ns) into *slot. A timestamp node for CUDA graphs, where it
// is cheaper than an event-record node; the RMSNorm kernel can write the same stamp at no extra launch.
extern "C" __global__ void kvscope_stamp(unsigned long long* slot) {
    *slot = global_timer_ns();
}
