"""Samplers are values: `make_sampler(...)` returns a callable that owns its RNG.

The full-vocabulary passes (temperature, min-p cut, top-k threshold) run in one numba
kernel over preallocated buffers; only the few surviving candidates are sorted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numba as nb
import numpy as np

Sampler = Callable[[np.ndarray], int]


@nb.njit(cache=True)
def _candidates(logits, inv_temp, top_k, min_p, idx, val):
    """Indices whose scaled logit survives min-p and top-k; returns how many (in idx/val)."""
    V = logits.shape[0]
    m = -np.inf
    for i in range(V):
        if logits[i] > m:
            m = logits[i]
    # min-p: keep p_i >= min_p * p_max  <=>  (l_i - m) * inv_temp >= log(min_p)
    cut = -np.inf if min_p <= 0.0 else m + math.log(min_p) / inv_temp
    n = 0
    for i in range(V):
        if logits[i] >= cut:
            idx[n] = i
            val[n] = (logits[i] - m) * inv_temp
            n += 1
    if 0 < top_k < n:
        order = np.argsort(-val[:n], kind="mergesort")[:top_k]
        tmp_i = idx[order].copy()
        tmp_v = val[order].copy()
        idx[:top_k] = tmp_i
        val[:top_k] = tmp_v
        n = top_k
    return n


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """Greedy when temperature <= 0; otherwise sample from the filtered, renormalised distribution."""
    if temperature <= 0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)
    idx = np.empty(0, np.int64)
    val = np.empty(0, np.float64)

    def sample(logits: np.ndarray) -> int:
        nonlocal idx, val
        if idx.shape[0] < logits.shape[0]:  # sized once, at the first call
            idx = np.empty(logits.shape[0], np.int64)
            val = np.empty(logits.shape[0], np.float64)
        n = _candidates(logits, 1.0 / temperature, top_k, min_p, idx, val)
        i, v = idx[:n], val[:n]
        order = np.argsort(-v, kind="stable")
        i, v = i[order], v[order]
        p = np.exp(v - v[0])
        p /= p.sum()
        if top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
            i, p = i[:keep], p[:keep] / p[:keep].sum()
        return int(i[min(int(np.searchsorted(np.cumsum(p), rng.random())), len(i) - 1)])

    return sample


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, window: int = 64):
    """llama.cpp's penalty: divide positive logits (multiply negative) of recently seen tokens."""
    if penalty == 1.0 or not history:
        return
    seen = np.unique(np.asarray(history[-window:], dtype=np.int64))
    vals = logits[seen]
    logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
