"""Device profiles, the memory and roofline planner, transports and the benchmark harness.
Nothing is registered here yet.

May import `models`, `kernels` and `runtimes`; never `toolchain` or `gui`.
"""
