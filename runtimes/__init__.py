"""What runs a model or an artifact: sampling and streaming generation with the KV cache (and,
as backends land, one Session per format).

May import `models` and `kernels`. Never imports `toolchain`: a device has runtimes, not the trainer.
"""
