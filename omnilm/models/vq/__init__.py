"""Discrete tokenizers' networks: the image VQ-VAE, the audio codec, and the EnCodec port (their
training loops are in omnilm/training/codec.py)."""

from .codec import AudioCodec
from .encodec import EncodecCodec
from .image_vqvae import ImageVQVAE
from .quantizers import ResidualVQ, VectorQuantizer

__all__ = [
    "AudioCodec",
    "EncodecCodec",
    "ImageVQVAE",
    "ResidualVQ",
    "VectorQuantizer",
]
