"""Numba kernels of the quantized KV cache (`edgert.quant.kv`), and their numpy references.

A quantized group of n values x stores an fp16 scale s = fp16((max - min) / levels), an fp16
minimum m = fp16(min) and codes c = clip(floor((x - m) / s + 1/2), 0, levels), levels = 2^bits - 1;
it reads back as c * s + m. Codes are packed along head_dim: one byte per channel at 8 bits;
at 4 bits byte i holds channel i in its low nibble and channel i + D/2 in its high one, so
that unpacking a row is two contiguous (vectorizable) sweeps. Scales and minimums are held
as fp16 bits (uint16), read through `F16_TABLE`.

Layouts, per layer ([kv heads, positions, ...]):
  codes        uint8  [H, S, D * bits / 8]
  per token    scale, min uint16 [H, S, D / cg]: groups of cg channels of one position
  per channel  scale, min uint16 [H, S / G, D]: one channel over G consecutive positions (4-bit keys)

The attention kernel reads these directly: each K or V row is dequantized once into a D-float
buffer and dotted with every query head of its group, so no full-precision copy ever exists.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from edgert.quant.kernels import _f32_as_u32, _round_f16
from numba import prange

from edgert.kernels import F16_TABLE, _add_value, _score_key

# ---- quantization ----------------------------------------------------------------------


@nb.njit(inline="always")
def _f16_bits(x):
    """The fp16 bit pattern of float32 x, rounded to nearest even (as numpy's astype(float16))."""
    r = _round_f16(x)
    b = np.int64(_f32_as_u32(r))
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a >= 0x7F800000:
        h = 0x7C00 if a == 0x7F800000 else 0x7E00
    elif a >= 0x38800000:  # normal: rebias the exponent from 127 to 15
        h = (a >> 13) - (112 << 10)
    else:  # subnormal: r is a multiple of 2^-24
        h = np.int64(abs(r) * np.float32(16777216.0))
    return np.uint16(sign | h)


@nb.njit(inline="always")
def _code(x, s, m, levels):
    if s == 0:
        return np.uint8(0)
    c = math.floor((x - m) / s + np.float32(0.5))
    return np.uint8(min(levels, max(0, c)))


@nb.njit(inline="always")
def _quantize_row(codes, scale, minv, row, bits, cg, table):
    """One position's D values (float32 `row`) -> codes, and per-token scale/min of cg-channel groups."""
    levels = (1 << bits) - 1
    for g in range(row.shape[0] // cg):
        lo = row[g * cg]
        hi = lo
        for i in range(g * cg, (g + 1) * cg):
            lo = min(lo, row[i])
            hi = max(hi, row[i])
        sb = _f16_bits((hi - lo) / np.float32(levels))
        mb = _f16_bits(lo)
        scale[g], minv[g] = sb, mb
        s, m = table[sb], table[mb]
        half = row.shape[0] // 2
        for i in range(g * cg, (g + 1) * cg):
            c = _code(row[i], s, m, levels)
            if bits == 8:
                codes[i] = c
            elif i < half:  # groups of the first half come first: they set the byte
                codes[i] = c
            else:
                codes[i - half] |= c << 4


@nb.njit(cache=True)
def quantize_rows(codes, scale, minv, x, pos, bits, cg, table):
    """x[T, H, D] (float32) -> per-token codes and scales of positions pos..pos+T-1."""
    T, H, _ = x.shape
    for t in range(T):
        for h in range(H):
            _quantize_row(codes[h, pos + t], scale[h, pos + t], minv[h, pos + t], x[t, h], bits, cg, table)


@nb.njit(cache=True)
def flush_group(k_codes, k_scale, k_min, v_codes, v_scale, v_min, res_k, res_v, nq, G, cg, sink, table):
    """Quantize the G oldest residual positions (fp16 bits res_k/res_v [H, >=G, D]) as positions
    nq..nq+G-1: keys 4-bit per channel over the G positions, values 4-bit per token. Positions
    below `sink` (kept in fp16 elsewhere) are left out of the key ranges."""
    H, _, D = res_k.shape
    g = nq // G
    t0 = max(0, sink - nq)
    row = np.empty(D, np.float32)
    for h in range(H):
        for t in range(G):
            for i in range(D // 2):
                k_codes[h, nq + t, i] = 0
        for d in range(D):
            lo = table[res_k[h, t0, d]]
            hi = lo
            for t in range(t0 + 1, G):
                x = table[res_k[h, t, d]]
                lo = min(lo, x)
                hi = max(hi, x)
            sb = _f16_bits((hi - lo) / np.float32(15.0))
            mb = _f16_bits(lo)
            k_scale[h, g, d], k_min[h, g, d] = sb, mb
            s, m = table[sb], table[mb]
            byte, shift = d % (D // 2), 4 * (d // (D // 2))
            for t in range(G):
                k_codes[h, nq + t, byte] |= _code(table[res_k[h, t, d]], s, m, 15) << shift
        for t in range(G):
            for d in range(D):
                row[d] = table[res_v[h, t, d]]
            _quantize_row(v_codes[h, nq + t], v_scale[h, nq + t], v_min[h, nq + t], row, 4, cg, table)


# ---- dequantization of one row ---------------------------------------------------------


@nb.njit(inline="always")
def _token_row(row, codes, scale, minv, bits, cg, table):
    """row[:] = one position of a per-token store (codes [D*bits/8], scale/min [D/cg])."""
    if bits == 8:
        for g in range(row.shape[0] // cg):
            s, m = table[scale[g]], table[minv[g]]
            for d in range(g * cg, (g + 1) * cg):
                row[d] = np.float32(codes[d]) * s + m
        return
    half = row.shape[0] // 2
    seg = math.gcd(cg, half)  # a run of bytes whose low and whose high nibbles each share a group
    for i0 in range(0, half, seg):
        s, m = table[scale[i0 // cg]], table[minv[i0 // cg]]
        s2, m2 = table[scale[(i0 + half) // cg]], table[minv[(i0 + half) // cg]]
        for i in range(i0, i0 + seg):
            b = codes[i]
            row[i] = np.float32(b & 15) * s + m
            row[i + half] = np.float32(b >> 4) * s2 + m2


@nb.njit(inline="always")
def _channel_row(row, codes, ks, km):
    """row[:] = one position of a 4-bit per-channel store, its group's scales ks/km as float32."""
    half = row.shape[0] // 2
    for i in range(half):
        b = codes[i]
        row[i] = np.float32(b & 15) * ks[i] + km[i]
        row[i + half] = np.float32(b >> 4) * ks[i + half] + km[i + half]


@nb.njit(inline="always")
def _load_scales(ks, km, scale, minv, table):
    for d in range(ks.shape[0]):
        ks[d] = table[scale[d]]
        km[d] = table[minv[d]]


@nb.njit(cache=True)
def dequantize(out_k, out_v, k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, G, cg, p0, table):
    """Positions p0..p0+n-1 of the quantized store into float32 out_k, out_v [H, n, D]."""
    H, n, D = out_k.shape
    ks = np.empty(D, np.float32)
    km = np.empty(D, np.float32)
    for h in range(H):
        for t in range(n):
            j = p0 + t
            if bits == 4:
                _load_scales(ks, km, k_scale[h, j // G], k_min[h, j // G], table)
                _channel_row(out_k[h, t], k_codes[h, j], ks, km)
            else:
                _token_row(out_k[h, t], k_codes[h, j], k_scale[h, j], k_min[h, j], bits, cg, table)
            _token_row(out_v[h, t], v_codes[h, j], v_scale[h, j], v_min[h, j], bits, cg, table)


# ---- attention -------------------------------------------------------------------------


@nb.njit(inline="always")
def _fp16_row(row, r, table):
    for d in range(row.shape[0]):
        row[d] = table[r[d]]


@nb.njit(inline="always")
def _key(row, ks, km, cur, kv, j, k_codes, k_scale, k_min, bits, G, cg, nq, res_k, sink_k, table):
    """row[:] = key j of kv head `kv`; returns the per-channel group whose scales ks/km hold."""
    if j < sink_k.shape[1]:  # the first positions, kept in fp16
        _fp16_row(row, sink_k[kv, j], table)
    elif j >= nq:  # fp16 residual
        _fp16_row(row, res_k[kv, j - nq], table)
    elif bits == 4:
        g = j // G
        if g != cur:
            _load_scales(ks, km, k_scale[kv, g], k_min[kv, g], table)
            cur = g
        _channel_row(row, k_codes[kv, j], ks, km)
    else:
        _token_row(row, k_codes[kv, j], k_scale[kv, j], k_min[kv, j], bits, cg, table)
    return cur


@nb.njit(inline="always")
def _value(row, kv, j, v_codes, v_scale, v_min, bits, cg, nq, res_v, sink_v, table):
    if j < sink_v.shape[1]:
        _fp16_row(row, sink_v[kv, j], table)
    elif j >= nq:
        _fp16_row(row, res_v[kv, j - nq], table)
    else:
        _token_row(row, v_codes[kv, j], v_scale[kv, j], v_min[kv, j], bits, cg, table)


@nb.njit(cache=True, parallel=True, fastmath={"reassoc", "nsz", "contract"})
def attention_q(
    out, q, pos0, scale, window, softcap, scores, k_codes, k_scale, k_min, v_codes, v_scale, v_min,
    bits, G, cg, nq, res_k, res_v, sink_k, sink_v, table,
):  # fmt: skip
    """Causal attention of q[T, Hq, D] (positions pos0..) over a quantized cache.

    Positions < nq are read from the quantized store (4-bit: keys per channel in groups of G
    positions, values per token; 8-bit: both per token), positions >= nq from the fp16
    residual res_k/res_v [H, R, D], and positions below sink_k.shape[1] from the fp16 sink_k,
    sink_v [H, n_sink, D] (all fp16 as uint16 bits). Work items, windowing and the three passes
    (scores, softmax, weighted values) are those of `edgert.kernels.attention_f16`, in float32
    without its fp16 roundings. scores: float32 scratch [>= T * Hq, S].
    """
    T, Hq, D = q.shape
    Hkv = k_codes.shape[0]
    group = Hq // Hkv
    n_blocks = min(T, max(1, 8 // Hkv))
    per = (T + n_blocks - 1) // n_blocks
    for item in prange(Hkv * n_blocks):
        kv, b = item // n_blocks, item % n_blocks
        t0, t1 = b * per, min(T, (b + 1) * per)
        if t0 >= t1:
            continue
        lo_all = 0 if window <= 0 else max(0, pos0 + t0 - window + 1)
        hi_all = pos0 + t1
        row = np.empty(D, np.float32)
        ks = np.empty(D, np.float32)
        km = np.empty(D, np.float32)
        cur = -1
        for j in range(lo_all, hi_all):
            cur = _key(
                row, ks, km, cur, kv, j, k_codes, k_scale, k_min, bits, G, cg, nq, res_k, sink_k, table
            )
            _score_key(scores, q, row, j, t0, t1, pos0, kv, group, window, scale, softcap)
        for t in range(t0, t1):
            p = pos0 + t
            lo = 0 if window <= 0 else max(0, p - window + 1)
            for h in range(kv * group, (kv + 1) * group):
                s = scores[t * Hq + h]
                m = np.float32(-np.inf)
                for j in range(lo, p + 1):
                    m = max(m, s[j])
                total = np.float32(0.0)
                for j in range(lo, p + 1):
                    e = np.float32(math.exp(s[j] - m))
                    s[j] = e
                    total += e
                inv = np.float32(1.0) / total
                for j in range(lo, p + 1):
                    s[j] *= inv
                o = out[t, h]
                for d in range(D):
                    o[d] = 0.0
        for j in range(lo_all, hi_all):
            _value(row, kv, j, v_codes, v_scale, v_min, bits, cg, nq, res_v, sink_v, table)
            _add_value(out, scores, row, j, t0, t1, pos0, kv, group, window)


def attend(out, q, pos0, scale, window, softcap, scores, c) -> None:
    """attention_q over QuantKVCache c (which holds positions < pos0 + T)."""
    attention_q(
        out, q, pos0, scale, window, softcap, scores, c.k_codes, c.k_scale, c.k_min, c.v_codes,
        c.v_scale, c.v_min, c.bits, c.group, c.channel_group, c.n_quant, c.res_k_bits, c.res_v_bits,
        c.sink_k_bits, c.sink_v_bits, F16_TABLE,
    )  # fmt: skip


# ---- numpy references ------------------------------------------------------------------


def quantize_ref(x: np.ndarray, bits: int) -> np.ndarray:
    """x quantized in groups along its last axis, read back as float32 (the rule above)."""
    x = x.astype(np.float32)
    levels = np.float32((1 << bits) - 1)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    s = ((hi - lo) / levels).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1.0))
    c = np.where(s > 0, np.floor((x - m) / safe + np.float32(0.5)), np.float32(0.0))
    return np.clip(c, 0, levels) * s + m


def cache_ref(k, v, bits, G, cg, nq, sink):
    """What a cache holding k, v [H, N, D] (float32, as written) returns for each position:
    positions < nq quantized as `bits` says, the rest rounded to fp16 (4-bit) or quantized (8-bit);
    4-bit: the first `sink` positions stay in fp16, and are left out of their group's key ranges."""
    H, N, D = k.shape
    if bits == 8:
        return (quantize_ref(x.reshape(H, N, D // cg, cg), 8).reshape(H, N, D) for x in (k, v))
    k16, v16 = (x.astype(np.float16).astype(np.float32) for x in (k, v))
    kq, vq = k16.copy(), v16.copy()
    kr = k16[:, :nq].copy()
    kr[:, :sink] = kr[:, sink : sink + 1]  # a stand-in inside the range: the sink does not widen it
    by_channel = kr.reshape(H, nq // G, G, D).transpose(0, 1, 3, 2)
    kq[:, :nq] = quantize_ref(by_channel, 4).transpose(0, 1, 3, 2).reshape(H, nq, D)
    vq[:, :nq] = quantize_ref(v16[:, :nq].reshape(H, nq, D // cg, cg), 4).reshape(H, nq, D)
    kq[:, :sink], vq[:, :sink] = k16[:, :sink], v16[:, :sink]
    return kq, vq
