"""Emu3: a Llama-shaped decoder over one vocabulary of text and VQ image tokens, plus the VQ-VAE.

An image in the prompt is `<|image start|>h*w<|image token|>`, then h * (w + 1) `<image>` placeholders,
`<|extra_201|>` and `<|image end|>`. The model encodes the pixels with its VQ-VAE to an h x w grid of
codes, maps each code to its BPE id ("<|visual token 000123|>"), appends the end-of-line id to every
row, and embeds those ids in place of the placeholders (transformers' Emu3Model.get_image_tokens).
The VQ-VAE keeps transformers' name `vqmodel`; the decoder is `language_model` as elsewhere.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from .omni import OmniModel
from .vq.emu3_vqvae import Emu3VQConfig, Emu3VQVAE


class Emu3Model(OmniModel):
    def __init__(self, cfg: ModelConfig, vq: Emu3VQConfig, vocabulary_map: dict[str, int]):
        super().__init__(cfg)
        self.vqmodel = Emu3VQVAE(vq).eval()
        self.vocabulary_map = dict(vocabulary_map)
        visual = sorted(
            (int(k[-8:-2]), v) for k, v in vocabulary_map.items() if k.startswith("<|visual token")
        )
        if [c for c, _ in visual] != list(range(vq.codebook_size)):
            raise ConfigError(
                f"vocabulary_map has {len(visual)} visual tokens, not one per code of the {vq.codebook_size}-code book"
            )
        # code -> BPE id; a table, not a state-dict entry (rebuilt from the vocabulary map)
        self.register_buffer("img2bpe", torch.tensor([v for _, v in visual]), persistent=False)
        self.eol_token_id = vocabulary_map.get("<|extra_200|>")
        self.image_token_id = vocabulary_map.get("<image>")

    @property
    def hf_format(self) -> str:
        return "emu3"

    def image_tokens(self, pixel_values, image_sizes=None) -> torch.Tensor:
        """(N, 3, H, W) and (N, 2) sizes -> the BPE ids of all images, rows ended by end-of-line, flat."""
        f = self.vqmodel.config.spatial_factor
        codes = self.vqmodel.encode(pixel_values)  # (N, H / f, W / f)
        if image_sizes is None:
            image_sizes = [pixel_values.shape[-2:]] * pixel_values.shape[0]
        out = []
        for c, (h, w) in zip(codes, image_sizes):
            c = c[: int(h) // f, : int(w) // f]  # (h, w): the image without batch padding
            eol = torch.full((c.shape[0], 1), self.eol_token_id, dtype=torch.long, device=c.device)
            out.append(torch.cat([self.img2bpe.to(c.device)[c], eol], dim=1).flatten())
        return torch.cat(out)

    def embed(self, input_ids, pixel_values=None, input_features=None, image_sizes=None):
        if input_features is not None:
            raise ConfigError("this model has no audio encoder, but audio inputs were given")
        if pixel_values is None:
            return self.language_model.model.embed_tokens(input_ids)
        bpe = self.image_tokens(pixel_values, image_sizes)
        slots = input_ids == self.image_token_id
        if int(slots.sum()) != bpe.numel():
            raise ConfigError(
                f"{int(slots.sum())} <image> placeholder tokens in the prompt but the images give "
                f"{bpe.numel()} tokens (rows of codes plus one end-of-line each)"
            )
        ids = input_ids.clone()
        ids[slots] = bpe
        return self.language_model.model.embed_tokens(ids)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, input_features=None, **kwargs):
        image_sizes = kwargs.pop("image_sizes", None)
        if pixel_values is not None and kwargs.get("inputs_embeds") is None:
            self._check_inputs(input_ids, attention_mask, None, input_features, None, None)
            kwargs["inputs_embeds"] = self.embed(input_ids, pixel_values, input_features, image_sizes)
        return super().forward(input_ids, attention_mask, input_features=input_features, **kwargs)
