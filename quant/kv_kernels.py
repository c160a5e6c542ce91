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
A decoding step splits the positions across threads (split-K); see `attention_q`.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from edgert.quant.kernels import _f32_as_u32, _round_f16, _u32_as_f32
from numba import prange

from edgert.kernels import F16_TABLE, _add_value, _score_key, row_max, split_count, visible, work_item

_FAST = {"reassoc", "nsz", "contract"}

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
def flush_keys(k_codes, k_scale, k_min, res_k, nq, G, sink, table):
    """Quantize the G oldest residual keys (fp16 bits res_k [H, >=G, D]) as positions nq..nq+G-1,
    4-bit per channel over the G positions. Positions below `sink` (kept in fp16 elsewhere) are
    left out of the ranges."""
    H, _, D = res_k.shape
    g = nq // G
    t0 = max(0, sink - nq)
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


# ---- dequantization of one row ---------------------------------------------------------
# Rows are built in contiguous sweeps over 1-D views (codes to floats, then one multiply-add),
# which LLVM turns into SIMD; indexing the 3-D stores inside these loops kept them scalar.


@nb.njit(inline="always", fastmath=_FAST)
def _nibbles(row, codes):
    """row[:] = the 4-bit codes of one position, as floats (low nibbles, then high ones)."""
    half = row.shape[0] // 2
    for i in range(half):
        row[i] = np.float32(codes[i] & 15)
    for i in range(half):
        row[half + i] = np.float32(codes[i] >> 4)


@nb.njit(inline="always", fastmath=_FAST)
def _bytes(row, codes):
    for i in range(row.shape[0]):
        row[i] = np.float32(codes[i])


@nb.njit(inline="always", fastmath=_FAST)
def _affine(row, s, m):
    for d in range(row.shape[0]):
        row[d] = row[d] * s + m


@nb.njit(inline="always", fastmath=_FAST)
def _affine_channels(row, s, m):
    for d in range(row.shape[0]):
        row[d] = row[d] * s[d] + m[d]


@nb.njit(inline="always", fastmath=_FAST)
def _token_row(row, codes, scale, minv, bits, cg, table):
    """row[:] = one position of a per-token store (codes [D*bits/8], scale/min [D/cg])."""
    if bits == 8:
        _bytes(row, codes)
    else:
        _nibbles(row, codes)
    for g in range(row.shape[0] // cg):
        _affine(row[g * cg : (g + 1) * cg], table[scale[g]], table[minv[g]])


@nb.njit(inline="always", fastmath=_FAST)
def _channel_row(row, codes, ks, km):
    """row[:] = one position of a 4-bit per-channel store, its group's scales ks/km as float32."""
    _nibbles(row, codes)
    _affine_channels(row, ks, km)


@nb.njit(inline="always")
def _load_scales(ks, km, scale, minv, table):
    for d in range(ks.shape[0]):
        ks[d] = table[scale[d]]
        km[d] = table[minv[d]]


@nb.njit(inline="always")
def _fp16_row(row, r, table):
    for d in range(row.shape[0]):
        row[d] = table[r[d]]


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


@nb.njit(inline="always", fastmath=_FAST)
def _exp(x):
    """e^x for x <= 0 (softmax), within 2 ulp of math.exp (`exp_ref` test); branch-free, so that
    the softmax loop vectorizes (math.exp is a call per element). Below -87 it returns ~1e-38."""
    x = max(x, np.float32(-87.0))
    n = math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = (x - n * np.float32(0.693145751953125)) - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040)
    p = p * r + np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _u32_as_f32(np.uint32((np.int32(n) + 127) << 23))


@nb.njit(cache=True)
def exp_ref(x, out):  # test hook for _exp
    for i in range(x.shape[0]):
        out[i] = _exp(x[i])


@nb.njit(inline="always", fastmath=_FAST)
def _axpy(o, w, b):
    for d in range(b.shape[0]):
        o[d] += w * b[d]


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
def _value(row, kv, j, v_codes, v_scale, v_min, bits, cg, sink_v, recent_v, v_from, table):
    if j < sink_v.shape[1]:
        _fp16_row(row, sink_v[kv, j], table)
    elif j >= v_from:
        _fp16_row(row, recent_v[kv, j % recent_v.shape[1]], table)
    else:
        _token_row(row, v_codes[kv, j], v_scale[kv, j], v_min[kv, j], bits, cg, table)


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def attention_q(
    out, q, pos0, scale, window, softcap, scores, part, stats, rows, threads, k_codes, k_scale,
    k_min, v_codes, v_scale, v_min, bits, G, cg, nq, res_k, sink_k, sink_v, recent_v, v_from, table,
):  # fmt: skip
    """Causal attention of q[T, Hq, D] (positions pos0..) over a quantized cache.

    Positions < nq are read from the quantized store (4-bit: keys per channel in groups of G
    positions, values per token; 8-bit: both per token), keys at positions >= nq from the fp16
    residual res_k [H, R, D], values at positions >= v_from from the fp16 ring recent_v
    [H, RV, D] (position j at j % RV), and positions below sink_k.shape[1] from the fp16 sink_k,
    sink_v [H, n_sink, D] (all fp16 as uint16 bits). Each K or V row is dequantized once per work item,
    in float32, and used by every query head of its group and every token of the item.

    Work items are (kv head, block of query tokens, chunk of positions). With few tokens (a
    decoding step) there would be only as many items as KV heads (one, on gemma3), so the
    positions are split into chunks (split-K, as flash-decoding): each item's softmax is
    relative to its own maximum, its unnormalized output and statistics go to part/stats
    (`edgert.kernels.AttentionScratch`), and a final pass merges the chunks. scores: float32 scratch
    [>= T * Hq, S]. threads: numba's thread count.
    """
    T, Hq, D = q.shape
    Hkv = k_codes.shape[0]
    group = Hq // Hkv
    n_blocks = min(T, max(1, 8 // Hkv))
    per = (T + n_blocks - 1) // n_blocks
    n_chunks = split_count(T, Hkv * n_blocks, pos0, window, part, rows, threads)
    for item in prange(Hkv * n_blocks * n_chunks):
        kv, c, t0, t1, c0, c1 = work_item(item, n_blocks, n_chunks, per, T, pos0, window)
        row, ks, km = rows[item, 0], rows[item, 1], rows[item, 2]
        cur = -1
        for j in range(c0, c1):
            cur = _key(
                row, ks, km, cur, kv, j, k_codes, k_scale, k_min, bits, G, cg, nq, res_k, sink_k, table
            )
            _score_key(scores, q, row, j, t0, t1, pos0, kv, group, window, scale, softcap)
        dst = out if n_chunks == 1 else part[c]
        for t in range(t0, t1):
            lo, hi = visible(pos0 + t, window, c0, c1)
            for h in range(kv * group, (kv + 1) * group):
                s = scores[t * Hq + h]
                m = row_max(s, lo, hi)
                total = np.float32(0.0)
                for j in range(lo, hi):
                    e = _exp(s[j] - m)
                    s[j] = e
                    total += e
                if n_chunks == 1:
                    inv = np.float32(1.0) / total
                    for j in range(lo, hi):
                        s[j] *= inv
                else:
                    stats[c, t, h, 0] = total
                    stats[c, t, h, 1] = m
                o = dst[t, h]
                for d in range(D):
                    o[d] = 0.0
        for j in range(c0, c1):
            _value(row, kv, j, v_codes, v_scale, v_min, bits, cg, sink_v, recent_v, v_from, table)
            _add_value(dst, scores, row, j, t0, t1, pos0, kv, group, window)
    if n_chunks > 1:  # merge the chunks: rescale each to the overall maximum
        for t in range(T):
            for h in range(Hq):
                m = np.float32(-np.inf)
                for c in range(n_chunks):
                    if stats[c, t, h, 0] > 0:
                        m = max(m, stats[c, t, h, 1])
                o = out[t, h]
                for d in range(D):
                    o[d] = 0.0
                total = np.float32(0.0)
                for c in range(n_chunks):
                    if stats[c, t, h, 0] > 0:
                        f = _exp(stats[c, t, h, 1] - m)
                        total += f * stats[c, t, h, 0]
                        _axpy(o, f, part[c, t, h])
                inv = np.float32(1.0) / total
                for d in range(D):
                    o[d] *= inv


def attend(out, q, pos0, scale, window, softcap, scores, scratch, c) -> None:
    """attention_q over QuantKVCache c (which holds positions < pos0 + T)."""
    attention_q(
        out, q, pos0, scale, window, softcap, scores, scratch.part, scratch.stats, scratch.rows,
        nb.get_num_threads(), c.k_codes, c.k_scale, c.k_min, c.v_codes, c.v_scale, c.v_min, c.bits,
        c.group, c.channel_group, c.n_quant, c.res_k_bits, c.sink_k_bits, c.sink_v_bits,
        c.recent_v_bits, c.recent_from, F16_TABLE,
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


def cache_ref(k, v, bits, G, cg, nq, sink, recent):
    """What a cache holding k, v [H, N, D] (float32, as written) returns for each position:
    8-bit: keys and values quantized per token. 4-bit: values quantized per token; keys at
    positions < nq quantized per channel in groups of G positions, the rest rounded to fp16; the
    first `sink` positions stay in fp16, and are left out of their group's key ranges, and so do
    the values of the last `recent` positions."""
    H, N, D = k.shape
    if bits == 8:
        return (quantize_ref(x.reshape(H, N, D // cg, cg), 8).reshape(H, N, D) for x in (k, v))
    k16, v16 = (x.astype(np.float16).astype(np.float32) for x in (k, v))
    kq = k16.copy()
    kr = k16[:, :nq].copy()
    kr[:, :sink] = kr[:, sink : sink + 1]  # a stand-in inside the range: the sink does not widen it
    by_channel = kr.reshape(H, nq // G, G, D).transpose(0, 1, 3, 2)
    kq[:, :nq] = quantize_ref(by_channel, 4).transpose(0, 1, 3, 2).reshape(H, nq, D)
    vq = quantize_ref(v.reshape(H, N, D // cg, cg), 4).reshape(H, N, D)
    kq[:, :sink], vq[:, :sink] = k16[:, :sink], v16[:, :sink]
    vq[:, N - min(N, recent) :] = v16[:, N - min(N, recent) :]
    return kq, vq
