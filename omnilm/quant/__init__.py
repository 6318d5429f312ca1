"""Low-bit inference applied from outside: `quantize_model` swaps nn.Linear for QuantLinear after build;
io.py writes and reads the compressed-tensors layout."""

from .formats import SCHEMES, Scheme, get_scheme
from .linear import QuantEmbedding, QuantLinear, quant_modules, quantize_model

__all__ = [
    "SCHEMES",
    "Scheme",
    "get_scheme",
    "QuantEmbedding",
    "QuantLinear",
    "quant_modules",
    "quantize_model",
]
