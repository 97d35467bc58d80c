"""Fused ops (torch custom ops) with a reference, a CPU and a Triton implementation, plus their
ONNX lowerings. Nothing is registered here yet.

May import `models` only; never `toolchain`, `runtimes`, `devices` or `gui`.
"""
