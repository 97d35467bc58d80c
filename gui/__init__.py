"""The Gradio app over the whole pipeline: `edgesmith gui`. It only calls `toolchain`, `runtimes` and
`devices` and holds no logic of its own: long work runs as `edgesmith` commands through
`toolchain.jobs`, results are read back from the files those commands write.

Importing this package turns Gradio's analytics and the Hugging Face Hub's telemetry off before
Gradio can be imported (DESIGN.md: no data leaves the machine); nothing else happens at import.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
