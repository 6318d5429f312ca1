"""The model class a config needs: OmniModel, or the Mllama composite for cross-attention fusion.

Everything that builds a model from a config (omnilm.build, plan, OmniLM-format loading, training
checkpoints) asks here, so a fusion path with its own composite needs no dispatch of its own.
"""

from ..config import ModelConfig
from .omni import OmniModel


def model_class(cfg: ModelConfig) -> type[OmniModel]:
    if cfg.cross_attention is not None:
        from .mllama import MllamaModel

        return MllamaModel
    return OmniModel
