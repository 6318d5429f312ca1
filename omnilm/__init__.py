"""OmniLM: multimodal decoder-only language models in PyTorch.

The public API (kept stable; see ARCHITECTURE.md): load, build, load_encoder, load_processor, load_codec,
Pipeline. Implemented in omnilm/api.py and omnilm/pipeline.py; `import omnilm` itself imports no torch.
"""

from __future__ import annotations

from .api import BUNDLED_MODELS, build, load, load_codec, load_encoder, load_processor

__version__ = "0.1.0"
__all__ = ["load", "build", "load_encoder", "load_processor", "load_codec", "Pipeline", "BUNDLED_MODELS"]


def __getattr__(name):  # Pipeline imports torch: only when asked for, so `omnilm plan` starts fast
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'omnilm' has no attribute {name!r}")
