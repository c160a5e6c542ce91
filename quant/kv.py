"""Quantized KV caches: 8-bit per token, and 4-bit as KIVI (keys per channel, values per token).

`QuantKVCache` has the interface of `edgert.cache.KVCache` (`offset`, `trim`, `nbytes`), but
`update` stores k, v quantized and `attend` computes attention straight from the codes
(`kv_kernels.attention_q`); nothing is ever expanded into a full-precision copy.

8 bits: every position is quantized as it is written, keys and values alike, per token in
groups of 32 channels (asymmetric: fp16 scale and minimum per group).

4 bits (KIVI, Liu et al. 2024): keys are quantized per channel over groups of `group`
consecutive positions, which isolates the outlier channels of keys; values per token in groups
of 64 channels, as they are written. The newest keys wait in an fp16 residual until a whole
group can be quantized. The residual holds up to `group + slack` positions: a group is
quantized only when the residual is full, so at least `slack` (default 16, a
speculative-decoding window) fp16 keys always remain after a write. The values of the newest
RECENT positions are read from an fp16 ring instead of their codes (KIVI keeps recent values in
fp16 too: at ctx 4096 on SmolLM2 and Gemma 3, quantizing every value at once raised the KL to
the fp16 cache by 60%; the ring of 32 takes back half of that, for 1% of the bytes).
The first `SINK` positions also stay in fp16, keys and values, and out of their group's key
ranges: models park large attention on them (the "attention sink"), and their keys are outliers
that would widen every channel's range (on SmolLM2 at ctx 1024, keeping 4 of them cuts the KL
to the fp16 cache by a fifth). Per position the cache costs 0.281x fp16 (4.5 bits per
number); with its fp16 parts, 0.298x at 4096 positions.

Rollback (`trim(n)`) is exact for values, which are per token, and for keys still in the
residual: the kept positions are untouched, and writing the same tokens again gives the same
bits as before (groups are quantized at the same positions). This always covers the last
`slack` positions written. Rolling back further re-opens quantized key groups: their keys are
dequantized back into the residual, so they keep the precision they had but are quantized
again (from those values) when their group refills.

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
CHANNEL_GROUP = 32  # channels per per-token group at 8 bits
VALUE_GROUP = 64  # channels per per-token group of 4-bit values
SLACK = 16  # fp16 positions the 4-bit residual keeps after a group is quantized
SINK = 4  # first positions the 4-bit cache keeps in fp16
RECENT = 32  # newest positions whose values the 4-bit cache reads in fp16
KEY_RESIDUAL = GROUP + SLACK  # fp16 keys the 4-bit cache holds before quantizing a group
VALUE_RING = RECENT + SLACK  # fp16 values it holds: RECENT read, SLACK more survive a rollback


def check_kv_bits(bits: int) -> int:
    """bits, if a KV cache can have them; else OptionError."""
    if bits not in KV_BITS:
        raise OptionError(f"KV cache bits must be one of {', '.join(map(str, KV_BITS))}, not {bits}")
    return bits


def _channel_group(head_dim: int, bits: int) -> int:
    g = VALUE_GROUP if bits == 4 else CHANNEL_GROUP
    return g if head_dim % g == 0 else head_dim


def bytes_per_token(bits: int, n_kv_heads: int, head_dim: int) -> float:
    """KV bytes one more position costs in one layer (keys and values, all its KV heads)."""
    check_kv_bits(bits)
    if bits == 16:
        return 2 * n_kv_heads * head_dim * 2
    codes = head_dim * bits / 8
    per_token_scales = 4 * head_dim / _channel_group(head_dim, bits)  # fp16 scale + minimum per group
    key_scales = 4 * head_dim / GROUP if bits == 4 else per_token_scales
    return n_kv_heads * (2 * codes + per_token_scales + key_scales)


def fixed_bytes(bits: int, n_kv_heads: int, head_dim: int) -> int:
    """KV bytes one layer holds whatever the length: the 4-bit cache's fp16 parts (key residual,
    value ring, the sink's keys and values)."""
    fp16_positions = KEY_RESIDUAL + VALUE_RING + 2 * SINK
    return n_kv_heads * fp16_positions * head_dim * 2 if check_kv_bits(bits) == 4 else 0


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
        self.channel_group = cg = _channel_group(D, bits)
        if D % 2:
            raise ValueError(f"head_dim {D} is odd")
        self.k_codes = np.empty((H, S, D * bits // 8), np.uint8)
        self.v_codes = np.empty((H, S, D * bits // 8), np.uint8)
        kshape = (H, -(-S // GROUP), D) if bits == 4 else (H, S, D // cg)
        self.k_scale, self.k_min = np.empty(kshape, np.uint16), np.empty(kshape, np.uint16)
        self.v_scale, self.v_min = np.empty((H, S, D // cg), np.uint16), np.empty((H, S, D // cg), np.uint16)
        self.res_k = np.empty((H, KEY_RESIDUAL if bits == 4 else 0, D), np.float16)
        self.res_k_bits = self.res_k.view(np.uint16)
        self.recent_v = np.empty((H, VALUE_RING if bits == 4 else 0, D), np.float16)  # p at p % ring
        self.recent_v_bits = self.recent_v.view(np.uint16)
        self.v_from = 0  # the values of positions v_from..offset-1 are in recent_v
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
        KQ.quantize_rows(
            self.v_codes, self.v_scale, self.v_min, v, pos, self.bits, self.channel_group, F16_TABLE
        )
        R = self.recent_v.shape[1]
        for p in range(max(pos, pos + T - R), pos + T):
            self.recent_v[:, p % R] = v[p - pos]
        self.v_from = max(self.v_from, pos + T - R)
        if self.bits == 8:
            KQ.quantize_rows(self.k_codes, self.k_scale, self.k_min, k, pos, 8, self.channel_group, F16_TABLE)
            self.offset = self.n_quant = pos + T
            return
        if pos < self.sink:
            n = min(T, self.sink - pos)
            self.sink_k[:, pos : pos + n] = k[:n].transpose(1, 0, 2)
            self.sink_v[:, pos : pos + n] = v[:n].transpose(1, 0, 2)
        G, cap, i = self.group, self.res_k.shape[1], 0
        while i < T:
            r = self.offset - self.n_quant
            m = min(T - i, cap - r)
            self.res_k[:, r : r + m] = k[i : i + m].transpose(1, 0, 2)
            self.offset += m
            i += m
            if r + m == cap:  # full: quantize the oldest group, keep `slack` positions in fp16
                self._flush()
                self.res_k[:, : self.slack] = self.res_k[:, G:cap]
                self.n_quant += G

    def _flush(self) -> None:
        c = self
        KQ.flush_keys(c.k_codes, c.k_scale, c.k_min, c.res_k_bits, c.n_quant, c.group, c.sink, F16_TABLE)

    def trim(self, n: int) -> int:
        """Forget the last n positions (speculative rollback); returns how many were dropped."""
        n = min(n, self.offset)
        keep = self.offset - n
        self.v_from = min(self.v_from, keep)
        if keep < self.n_quant and self.bits == 8:
            self.n_quant = keep
        elif keep < self.n_quant:  # re-open the key groups from keep's on, into the residual
            g0 = keep // self.group * self.group
            self.res_k[:, : keep - g0] = self.dequantize(g0, keep)[0]
            self.n_quant = g0
        self.offset = keep
        return n

    def dequantize(self, p0: int, p1: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions p0..p1-1 of the quantized store as attention reads them, float32
        [kv_heads, p1 - p0, head_dim]: the sink's and the recent values in fp16; for tests and rollback."""
        H, _, D = self.res_k.shape
        out_k, out_v = np.empty((H, p1 - p0, D), np.float32), np.empty((H, p1 - p0, D), np.float32)
        KQ.dequantize(
            out_k, out_v, self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale, self.v_min,
            self.bits, self.group, self.channel_group, p0, F16_TABLE,
        )  # fmt: skip
        n = max(0, min(p1, self.sink) - p0)
        out_k[:, :n], out_v[:, :n] = self.sink_k[:, p0 : p0 + n], self.sink_v[:, p0 : p0 + n]
        for p in range(max(p0, self.recent_from), p1):
            out_v[:, p - p0] = self.recent_v[:, p % self.recent_v.shape[1]]
        return out_k, out_v

    def attend(self, out, q, pos0: int, scale: float, window: int, softcap: float, scores, scratch) -> None:
        """Attention of q [T, Hq, D] at positions pos0.. over this cache, into out [T, Hq, D];
        scores and scratch (`edgert.kernels.AttentionScratch`) are the model's buffers."""
        KQ.attend(out, q, pos0, scale, window, softcap, scores, scratch, self)

    @property
    def recent_from(self) -> int:
        """The first position whose value attention reads from the fp16 ring (4-bit: the last
        RECENT; the ring holds `slack` more, so that a rollback within them keeps them)."""
        return max(self.v_from, self.offset - RECENT) if self.bits == 4 else self.offset

    @property
    def nbytes(self) -> int:
        """Bytes holding the used positions, plus the fp16 parts (what the budget must count)."""
        H, _, D = self.res_k.shape
        per_pos = bytes_per_token(self.bits, H, D)
        return int(np.ceil(fixed_bytes(self.bits, H, D) + per_pos * self.offset))
