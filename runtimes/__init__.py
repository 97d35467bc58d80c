"""What runs a model or an artifact: `load(path) -> Session`, one backend per format (torch,
onnxruntime, executorch, llamacpp, tensorrt), one sampler, streaming and speculative generation,
perplexity through the runtime.

May import `models` and `kernels`. Never imports `toolchain`: a device has runtimes, not the trainer.
"""

from runtimes.loader import load
from runtimes.sampling import GenerationConfig
from runtimes.session import Session
from runtimes.stats import GenerationStats

__all__ = ["load", "GenerationConfig", "GenerationStats", "Session"]
