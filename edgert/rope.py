"""RoPE scaling that divides each frequency by its own factor (Llama 3's), computed once for
the converter (which stores the factors as GGUF's rope_freqs.weight, as llama.cpp's does)
and for checkpoints loaded straight from their config. numpy only: the reference tools
import it without numba."""

from __future__ import annotations

import math

import numpy as np


def llama3_factors(rope: dict, head_dim: int, base: float) -> np.ndarray:
    """float32 [head_dim // 2]: what each rotary frequency base^(-2i/head_dim) is divided by.

    Wavelengths shorter than original_max_position_embeddings / high_freq_factor keep their
    frequency, those longer than original / low_freq_factor are divided by `factor`, and the
    ones between blend the two (transformers' `_compute_llama3_parameters`)."""
    factor = float(rope.get("factor", 8.0))
    lo, hi = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blend = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, blend))
    return out.astype(np.float32)
