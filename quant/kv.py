"""Quantized KV caches: 8-bit per token, and 4-bit as KIVI (keys per channel, values per token).

`QuantKVCache` has the interface of `edgert.cache.KVCache` (`offset`, `trim`, `nbytes`), but
`update` stores k, v quantized and `attend` computes attention straight from the codes
(`kv_kernels.attention_q`); nothing is ever expanded into a full-precision copy.

8 bits: every position is quantized as it is written, keys and values alike, per token in
groups of `channel_group` channels (asymmetric: fp16 scale and minimum per group).

4 bits (KIVI, Liu et al. 2024): keys are quantized per channel over groups of `group`
consecutive positions, which isolates the outlier channels of keys; values per token like
8 bits. The newest positions wait in an fp16 residual until a whole group can be quantized.
The residual holds up to `group + slack` positions: a group is quantized only when the
residual is full, so at least `slack` (default 16, a speculative-decoding window) fp16
positions always remain after a write. The first `SINK` positions also stay in fp16 and out
of their group's key ranges: models park large attention on them (the "attention sink"),
and their keys are outliers that would widen every channel's range (on SmolLM2 at ctx
1024, keeping 4 of them cuts the KL to the fp16 cache by a fifth).

Rollback (`trim(n)`): dropping positions that are still in the residual is exact: the kept
positions are untouched, and writing the same tokens again gives the same bits as before
(groups are quantized at the same positions). This always covers the last `slack` positions
written. Rolling back further re-opens quantized groups: their positions are dequantized
back into the residual, so they keep the precision they had but are quantized again (from
those values) when their group refills.

Storage is reserved once with np.empty for the whole context (pages are backed as positions
are written); a write allocates nothing per token.
"""

from __future__ import annotations

import numpy as np
from edgert.quant import kv_kernels as KQ

from edgert.errors import OptionError
from edgert.kernels import F16_TABLE

KV_BITS = (16, 8, 4)
GROUP = 64  # positions per 4-bit key group
CHANNEL_GROUP = 32  # channels per per-token group
SLACK = 16  # fp16 positions the 4-bit residual keeps after a group is quantized
SINK = 4  # first positions the 4-bit cache keeps in fp16


def check_kv_bits(bits: int) -> int:
    """bits, if a KV cache can have them; else OptionError."""
    if bits not in KV_BITS:
        raise OptionError(f"KV cache bits must be one of {', '.join(map(str, KV_BITS))}, not {bits}")
    return bits


def _channel_group(head_dim: int) -> int:
    return CHANNEL_GROUP if head_dim % CHANNEL_GROUP == 0 else head_dim


def bytes_per_token(bits: int, n_kv_heads: int, head_dim: int) -> float:
    """KV bytes one more position costs in one layer (keys and values, all its KV heads)."""
    check_kv_bits(bits)
    if bits == 16:
        return 2 * n_kv_heads * head_dim * 2
    codes = head_dim * bits / 8
    per_token_scales = 4 * head_dim / _channel_group(head_dim)  # fp16 scale + minimum per group
    key_scales = 4 * head_dim / GROUP if bits == 4 else per_token_scales
    return n_kv_heads * (2 * codes + per_token_scales + key_scales)


def fixed_bytes(bits: int, n_kv_heads: int, head_dim: int) -> int:
    """KV bytes one layer holds whatever the length: the 4-bit cache's fp16 residual and sink."""
    return 2 * n_kv_heads * (GROUP + SLACK + SINK) * head_dim * 2 if check_kv_bits(bits) == 4 else 0


def cache_bytes(bits: int, n_layers: int, n_kv_heads: int, head_dim: int, context: int) -> int:
    """KV bytes of a model's cache holding `context` positions."""
    per_layer = (
        fixed_bytes(bits, n_kv_heads, head_dim) + bytes_per_token(bits, n_kv_heads, head_dim) * context
    )
    return int(np.ceil(n_layers * per_layer))


class QuantKVCache:
    """One layer's 8-bit or 4-bit KV cache for n_kv_heads heads of head_dim over max_len positions."""

    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, bits: int):
        if bits not in (8, 4):
            raise ValueError(f"a quantized KV cache has 8 or 4 bits, not {bits}")
        H, S, D = n_kv_heads, max_len, head_dim
        self.bits = bits
        self.group = GROUP
        self.slack = SLACK
        self.channel_group = cg = _channel_group(D)
        if D % 2:
            raise ValueError(f"head_dim {D} is odd")
        self.k_codes = np.empty((H, S, D * bits // 8), np.uint8)
        self.v_codes = np.empty((H, S, D * bits // 8), np.uint8)
        kshape = (H, -(-S // GROUP), D) if bits == 4 else (H, S, D // cg)
        self.k_scale, self.k_min = np.empty(kshape, np.uint16), np.empty(kshape, np.uint16)
        self.v_scale, self.v_min = np.empty((H, S, D // cg), np.uint16), np.empty((H, S, D // cg), np.uint16)
        cap = GROUP + SLACK if bits == 4 else 0
        self.res_k, self.res_v = np.empty((H, cap, D), np.float16), np.empty((H, cap, D), np.float16)
        self.res_k_bits, self.res_v_bits = self.res_k.view(np.uint16), self.res_v.view(np.uint16)
        self.sink = sink = SINK if bits == 4 else 0
        self.sink_k, self.sink_v = np.empty((H, sink, D), np.float16), np.empty((H, sink, D), np.float16)
        self.sink_k_bits, self.sink_v_bits = self.sink_k.view(np.uint16), self.sink_v.view(np.uint16)
        self.offset = 0  # positions held
        self.n_quant = 0  # positions in the quantized store; the rest are in the residual

    @property
    def max_len(self) -> int:
        return self.k_codes.shape[1]

    def update(self, k: np.ndarray, v: np.ndarray, pos: int) -> None:
        """Write k, v [T, kv_heads, head_dim] (float32) at positions pos..pos+T-1.

        A write below the current length first drops the positions from pos on (as trim).
        """
        T = k.shape[0]
        if pos > self.offset or pos + T > self.max_len:
            raise ValueError(f"cannot write positions {pos}..{pos + T - 1} to a cache holding {self.offset}")
        self.trim(self.offset - pos)
        if self.bits == 8:
            KQ.quantize_rows(self.k_codes, self.k_scale, self.k_min, k, pos, 8, self.channel_group, F16_TABLE)
            KQ.quantize_rows(self.v_codes, self.v_scale, self.v_min, v, pos, 8, self.channel_group, F16_TABLE)
            self.offset = self.n_quant = pos + T
            return
        if pos < self.sink:
            n = min(T, self.sink - pos)
            self.sink_k[:, pos : pos + n] = k[:n].transpose(1, 0, 2)
            self.sink_v[:, pos : pos + n] = v[:n].transpose(1, 0, 2)
        G, cap, i = self.group, self.group + self.slack, 0
        while i < T:
            r = self.offset - self.n_quant
            m = min(T - i, cap - r)
            self.res_k[:, r : r + m] = k[i : i + m].transpose(1, 0, 2)
            self.res_v[:, r : r + m] = v[i : i + m].transpose(1, 0, 2)
            self.offset += m
            i += m
            if r + m == cap:  # full: quantize the oldest group, keep `slack` positions in fp16
                self._flush()
                self.res_k[:, : self.slack] = self.res_k[:, G:cap]
                self.res_v[:, : self.slack] = self.res_v[:, G:cap]
                self.n_quant += G

    def _flush(self) -> None:
        KQ.flush_group(
            self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale, self.v_min,
            self.res_k_bits, self.res_v_bits, self.n_quant, self.group, self.channel_group, self.sink,
            F16_TABLE,
        )  # fmt: skip

    def trim(self, n: int) -> int:
        """Forget the last n positions (speculative rollback); returns how many were dropped."""
        n = min(n, self.offset)
        keep = self.offset - n
        if keep < self.n_quant and self.bits == 8:
            self.n_quant = keep
        elif keep < self.n_quant:  # re-open the groups from keep's on, into the residual
            g0 = keep // self.group * self.group
            out_k, out_v = self.dequantize(g0, keep)
            self.res_k[:, : keep - g0] = out_k
            self.res_v[:, : keep - g0] = out_v
            self.n_quant = g0
        self.offset = keep
        return n

    def dequantize(self, p0: int, p1: int) -> tuple[np.ndarray, np.ndarray]:
        """Quantized positions p0..p1-1 as attention reads them, float32 [kv_heads, p1 - p0, head_dim]
        (the sink's in fp16); for tests and rollback."""
        H, _, D = self.res_k.shape
        out_k, out_v = np.empty((H, p1 - p0, D), np.float32), np.empty((H, p1 - p0, D), np.float32)
        KQ.dequantize(
            out_k, out_v, self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale, self.v_min,
            self.bits, self.group, self.channel_group, p0, F16_TABLE,
        )  # fmt: skip
        n = max(0, min(p1, self.sink) - p0)
        out_k[:, :n], out_v[:, :n] = self.sink_k[:, p0 : p0 + n], self.sink_v[:, p0 : p0 + n]
        return out_k, out_v

    def attend(self, out, q, pos0: int, scale: float, window: int, softcap: float, scores) -> None:
        """Attention of q [T, Hq, D] at positions pos0.. over this cache, into out [T, Hq, D]."""
        KQ.attend(out, q, pos0, scale, window, softcap, scores, self)

    @property
    def nbytes(self) -> int:
        """Bytes holding the used positions, plus the fp16 residual (what the budget must count)."""
        H, _, D = self.res_k.shape
        per_pos = bytes_per_token(self.bits, H, D)
        return int(np.ceil(fixed_bytes(self.bits, H, D) + per_pos * self.offset))
