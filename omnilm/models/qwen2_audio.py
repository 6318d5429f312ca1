"""Qwen2-Audio as one model: the OmniModel whose audio inputs carry `feature_attention_mask`.

The encoder (with its key padding mask and average pool) and the linear projector are in
models/audio/qwen2_audio.py; here clip k's first output_lengths(mask_k.sum()) projected frames fill the
k-th run of `<|AUDIO|>` placeholders (transformers' Qwen2AudioForConditionalGeneration).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .audio.qwen2_audio import output_lengths
from .omni import OmniModel, scatter_features


class Qwen2AudioModel(OmniModel):
    """OmniModel whose audio inputs take `feature_attention_mask` (N, 3000): 1 on a clip's real mel frames.

    Clip k's first output_lengths(mask_k.sum()) projected frames fill the k-th run of audio
    placeholders; without a mask every clip is a full 30 s (750 tokens).
    """

    @property
    def hf_format(self) -> str:
        return "qwen2_audio"

    def audio_features(self, input_features, feature_attention_mask=None):
        """(N, n_mels, 3000) -> (1, sum of clip lengths, D): the kept rows of all clips, in order."""
        feats = self.audio_projector(self.audio_tower(input_features.to(self.dtype), feature_attention_mask))
        if feature_attention_mask is None:
            return feats.reshape(1, -1, feats.shape[-1])
        _, n_tokens = output_lengths(feature_attention_mask.sum(-1).to(feats.device))
        keep = torch.arange(feats.shape[1], device=feats.device)[None] < n_tokens[:, None]  # (N, 750)
        return feats[keep][None]

    def embed(self, input_ids, pixel_values=None, input_features=None, feature_attention_mask=None):
        if pixel_values is not None:
            raise ConfigError("this model has no image encoder, but image inputs were given")
        embeds = self.language_model.model.embed_tokens(input_ids)  # (B, T, D)
        if input_features is None:
            return embeds
        feats = self.audio_features(input_features, feature_attention_mask)
        return scatter_features(embeds, input_ids, self.config.audio_token_id, feats, "audio")

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, input_features=None, **kwargs):
        mask = kwargs.pop("feature_attention_mask", None)
        if input_features is not None and kwargs.get("inputs_embeds") is None:
            if mask is not None and mask.shape != (input_features.shape[0], input_features.shape[-1]):
                raise ConfigError(
                    f"feature_attention_mask: expected ({input_features.shape[0]}, {input_features.shape[-1]}) "
                    f"like input_features' clips and frames, got {tuple(mask.shape)}"
                )
            self._check_inputs(
                input_ids, attention_mask, pixel_values, None, None, None
            )  # encoder checks features
            kwargs["inputs_embeds"] = self.embed(input_ids, pixel_values, input_features, mask)
        return super().forward(input_ids, attention_mask, pixel_values=pixel_values, **kwargs)
