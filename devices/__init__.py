"""Device profiles (`profiles`), the memory and roofline planner (`planner`), transports to a
device (`transports`: local, ssh, adb) and the benchmark harness (`bench`, with the on-device
`agent`). Importing the package imports nothing heavy: the agent zipapp ships this file.

May import `models`, `kernels` and `runtimes`; never `toolchain` or `gui`.
"""
