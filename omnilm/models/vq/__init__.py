"""Discrete tokenizers' networks: the image VQ-VAE, the audio codec, and the EnCodec port."""

from .codec import AudioCodec, train_audio_codec
from .encodec import EncodecCodec
from .image_vqvae import ImageVQVAE, train_image_vq
from .quantizers import ResidualVQ, VectorQuantizer

__all__ = [
    "AudioCodec",
    "EncodecCodec",
    "ImageVQVAE",
    "ResidualVQ",
    "VectorQuantizer",
    "train_audio_codec",
    "train_image_vq",
]
