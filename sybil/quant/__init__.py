"""Quantized weights: formats (plain tensor layouts), the modules holding them, SmoothQuant,
and quantize_model, which converts a model in place. Imports ops, never the model."""

from sybil.quant.convert import quantize_model
from sybil.quant.formats import MODES

__all__ = ["MODES", "quantize_model"]
