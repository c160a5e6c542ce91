"""Fused numba kernels that compute on GGUF blocks without expanding them to float32.

`matmul(out, x, w, qtype, scratch)` computes out[T, N] = x[T, K] @ W[N, K]^T with ggml's CPU semantics:
the activations are first quantized to the weight type's `vec_dot_type` (Q8_0, Q8_1 or Q8_K, with the
rounding of ggml's x86 `quantize_row_q8_*`). Each weight block then contributes an exact integer dot
product times float scales, as in `ggml_vec_dot_*`, for every activation row alike (prefill equals
decode); the float sums run one FMA chain per row, so results agree with llama.cpp to float
reassociation (about 1e-6 relative). With `scratch.ggml_order` (llama.cpp parity) the packed
kernels sum in ggml's x86 orders, so that results equal llama.cpp's bit for bit: blocks of 32
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) in 8 lanes of 4 values, one FMA chain each, then `hsum_float_8`
(the raw rows too); Q4_K and Q6_K in `ggml_vec_dot_*`'s lanes for a batch of fewer than 8 tokens
and in ggml's tiled kernel's order from 8 on (`scratch.ggml_batch`: the batch llama.cpp would
evaluate; pack.py's `_make_tile_k`). Q5_K, and K-quants in raw rows, keep the fast order.

`w` is either the raw GGUF rows (one fused dequant-and-dot per row, below) or a `PackedWeight` from
`pack` (pack.py: 16 rows interleaved, AVX512-VNNI kernels, several times faster; use it for models).

Deviation from ggml: F16/BF16 weights are widened to f32 and dotted with f32 activations
(ggml rounds the activations to f16 first); F32 weights are a plain f32 dot.
"""

from __future__ import annotations

import numba
import numpy as np
from edgert.quant import pack as _pk
from edgert.quant.formats import BLOCK_SIZE, QK_K, TYPE_SIZE, QType, as_qtype
from edgert.quant.pack import PackedWeight, pack  # noqa: F401  (re-exported: the matmul API)
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from edgert.errors import UnsupportedError

# Float accumulation may be reordered and fused (as ggml's AVX2 fmadd does); no nnan/ninf assumptions.
_FM = {"reassoc", "contract"}
_F32_2M112 = np.float32(2.0**-112)
_F32_2M24 = np.float32(2.0**-24)


def _bits_as_float(width: int):
    """An intrinsic: an integer's low `width` bits (32 or 64) read as a float32 / float64."""
    ity, fty = ir.IntType(width), ir.FloatType() if width == 32 else ir.DoubleType()
    nty = types.float32 if width == 32 else types.float64

    def typer(typingctx, u):
        if not isinstance(u, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            if u.bitwidth != width:
                v = builder.trunc(v, ity) if u.bitwidth > width else builder.sext(v, ity)
            return builder.bitcast(v, fty)

        return nty(u), codegen

    return intrinsic(typer)


_u32_as_f32, _u64_as_f64 = _bits_as_float(32), _bits_as_float(64)


@intrinsic
def _f32_as_u32(typingctx, f):
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(f), codegen


@intrinsic
def _fma32(typingctx, a, b, c):
    """a * b + c in float32 with one rounding (llvm.fma: one vfmadd on x86)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return _pk._call(builder, "llvm.fma.f32", ir.FloatType(), *args)

    return types.float32(a, b, c), codegen


@njit(inline="always")
def _f16(lo, hi):
    """fp16 (two little-endian bytes) -> float32, exact; branch-free like ggml's fp16_to_fp32."""
    h = np.uint32(lo) | (np.uint32(hi) << np.uint32(8))
    two_w = (h & np.uint32(0x7FFF)) << np.uint32(17)
    norm = _u32_as_f32((two_w >> np.uint32(4)) + np.uint32(0xE0 << 23)) * _F32_2M112
    denorm = _u32_as_f32((two_w >> np.uint32(17)) | np.uint32(126 << 23)) - np.float32(0.5)
    mag = norm if two_w >= np.uint32(1 << 27) else denorm
    return -mag if h & np.uint32(0x8000) else mag


@njit(inline="always")
def _round_f16(x):
    """The float32 value of fp16(x), rounded to nearest even (F16C `vcvtps2ph`); integer-only."""
    b = np.int64(_f32_as_u32(x))
    sign = b & 0x80000000
    a = b & 0x7FFFFFFF
    if a >= 0x7F800000:
        return x
    if a >= 0x38800000:  # fp16 normal range (or overflow to inf)
        r = (a + 0xFFF + ((a >> 13) & 1)) & ~0x1FFF
        if r >= 0x47800000:
            r = 0x7F800000
    else:  # fp16 subnormals are multiples of 2^-24
        e = a >> 23
        r = 0
        if e >= 102:
            m = (a & 0x7FFFFF) | 0x800000
            sh = 126 - e
            q = m >> sh
            rem = m & ((1 << sh) - 1)
            half = 1 << (sh - 1)
            if rem > half or (rem == half and (q & 1)):
                q += 1
            r = np.int64(_f32_as_u32(np.float32(q) * _F32_2M24))
    return _u32_as_f32(np.uint32(sign | r))


@njit(cache=True, nogil=True)
def _round_f16_array(x, out):  # test hook for _round_f16
    for i in range(x.shape[0]):
        out[i] = _round_f16(x[i])


# ---------------------------------------------------------------- activation quantization


@njit(inline="always")
def _q8_0_row(x, xq, xd, xs, with_sum, t):
    """ggml x86 quantize_row_q8_0 / q8_1: d = amax/127 (fp16), q = rint(x * (127/amax)), s = fp16(d*sum q)."""
    for b in range(x.shape[1] // 32):
        o = b * 32
        amax = np.float32(0)
        for j in range(32):
            amax = max(amax, abs(x[t, o + j]))
        d = amax / np.float32(127)
        idl = np.float32(127) / amax if amax != 0 else np.float32(0)
        s = 0
        for j in range(32):
            v = np.int32(np.rint(x[t, o + j] * idl))
            v = min(max(v, -128), 127)
            xq[t, o + j] = v
            s += v
        xd[t, b] = _round_f16(d)
        if with_sum:
            xs[t, b] = _round_f16(d * np.float32(s))


@njit(inline="always")
def _q8_k_row(x, xq, xd, bsums, t):
    """ggml quantize_row_q8_K: scale -127/max (signed max of largest magnitude), round half even."""
    for b in range(x.shape[1] // QK_K):
        o = b * QK_K
        amax = np.float32(0)
        mx = np.float32(0)
        for j in range(QK_K):
            ax = abs(x[t, o + j])
            if ax > amax:
                amax = ax
                mx = x[t, o + j]
        if amax == 0:
            xd[t, b] = 0
            for j in range(QK_K):
                xq[t, o + j] = 0
            for g in range(16):
                bsums[t, b * 16 + g] = 0
            continue
        iscale = np.float32(-127) / mx
        for g in range(16):
            s = 0
            for j in range(16):
                v = min(np.int32(np.rint(iscale * x[t, o + g * 16 + j])), 127)
                xq[t, o + g * 16 + j] = v
                s += v
            bsums[t, b * 16 + g] = s
        xd[t, b] = np.float32(1) / iscale


# One token runs serially (a parallel region costs more than it saves); a prompt chunk in parallel.


@njit(cache=True, nogil=True)
def _quantize_q8_0(x, xq, xd, xs, with_sum):
    for t in range(x.shape[0]):
        _q8_0_row(x, xq, xd, xs, with_sum, t)


@njit(parallel=True, nogil=True, cache=True)
def _quantize_q8_0_rows(x, xq, xd, xs, with_sum):
    for t in prange(x.shape[0]):
        _q8_0_row(x, xq, xd, xs, with_sum, t)


@njit(cache=True, nogil=True)
def _quantize_q8_k(x, xq, xd, bsums):
    for t in range(x.shape[0]):
        _q8_k_row(x, xq, xd, bsums, t)


@njit(parallel=True, nogil=True, cache=True)
def _quantize_q8_k_rows(x, xq, xd, bsums):
    for t in prange(x.shape[0]):
        _q8_k_row(x, xq, xd, bsums, t)


class MatmulScratch:
    """Preallocated activation-quantization buffers for `matmul`; nothing is allocated per call."""

    def __init__(self, max_rows: int, max_k: int):
        self.max_rows = int(max_rows)
        self.max_k = int(max_k)
        nb = self.max_k // 32 + 1
        self.xq = np.zeros((self.max_rows, self.max_k), np.int8)  # quantized activations
        self.xd = np.zeros((self.max_rows, nb), np.float32)  # per-block scale (f32 value of fp16 or f32)
        self.xs = np.zeros((self.max_rows, nb), np.float32)  # Q8_1 d * sum(q)
        self.bsums = np.zeros((self.max_rows, self.max_k // 16 + 1), np.int32)  # Q8_K sums of 16
        self.xsum = np.zeros((self.max_rows, nb), np.int32)  # integer sums of 32 (packed weights)
        self.xq_flat = self.xq.reshape(-1)
        nt = numba.config.NUMBA_NUM_THREADS
        self.wf = np.zeros((nt, self.max_k), np.float32)  # per-thread f32 weight row (F16/BF16, T > 1)
        self.accs = np.zeros((nt, _pk.ACC_MAX * _pk.TC), np.float32)  # per thread: [tokens, lanes, 16 rows]
        # flat views for the packed kernels, which index [row * (row length) + block]
        self.xd_flat, self.xs_flat = self.xd.reshape(-1), self.xs.reshape(-1)
        self.xsum_flat, self.bsp = self.xsum.reshape(-1), np.zeros_like(self.xsum)  # see pack.pair_sums
        self.bsp_flat = self.bsp.reshape(-1)
        self.held = None  # (activation type, T, K) of the activations quantized in xq, for same_input
        self.derived = None  # what xsum / bsp were last computed for
        # llama.cpp parity: the packed kernels sum in ggml's float orders (see the module's
        # docstring); else one FMA chain per row
        self.ggml_order = False
        self.ggml_batch = 0  # the batch llama.cpp would evaluate these rows in (0: the call's rows)


# ---------------------------------------------------------------- block layouts
# Inner loops run to `c16` (always 16), passed at run time: a constant trip count makes LLVM fully
# unroll the loop before vectorizing it, and the unrolled int8 reductions then stay scalar.


@njit(inline="always")
def _scale_min_k4(row, so, j):
    """ggml get_scale_min_k4: 6-bit scale and min of sub-block j from the 12 bytes at row[so:]."""
    if j < 4:
        return np.int32(row[so + j] & 63), np.int32(row[so + j + 4] & 63)
    sc = (row[so + j + 4] & 0x0F) | ((row[so + j - 4] >> 6) << 4)
    mn = (row[so + j + 4] >> 4) | ((row[so + j] >> 6) << 4)
    return np.int32(sc), np.int32(mn)


@njit(inline="always")
def _u32(row, o):
    return (
        np.uint32(row[o])
        | (np.uint32(row[o + 1]) << np.uint32(8))
        | (np.uint32(row[o + 2]) << np.uint32(16))
        | (np.uint32(row[o + 3]) << np.uint32(24))
    )


# ---------------------------------------------------------------- raw rows: fused dequant-and-dot per row


@njit(inline="always")
def _dot_q4_0(row, xq, xd, nb, c16):
    acc = np.float32(0)
    for b in range(nb):
        o = b * 18
        ox = b * 32
        s = np.int32(0)
        for j in range(c16):
            q = row[o + 2 + j]
            lo = np.int16(q & np.uint8(15)) - np.int16(8)
            hi = np.int16(q >> np.uint8(4)) - np.int16(8)
            s = np.int32(s + np.int32(lo * np.int16(xq[ox + j])) + np.int32(hi * np.int16(xq[ox + c16 + j])))
        acc += (_f16(row[o], row[o + 1]) * xd[b]) * np.float32(s)
    return acc


@njit(inline="always")
def _dot_q5_0(row, xq, xd, nb, c16):
    acc = np.float32(0)
    for b in range(nb):
        o = b * 22
        ox = b * 32
        qh = _u32(row, o + 2)
        s = np.int32(0)
        for j in range(c16):
            q = row[o + 6 + j]
            lo = np.int16((q & np.uint8(15)) | (((qh >> j) & 1) << 4)) - np.int16(16)
            hi = np.int16((q >> np.uint8(4)) | (((qh >> (j + 16)) & 1) << 4)) - np.int16(16)
            s = np.int32(s + np.int32(lo * np.int16(xq[ox + j])) + np.int32(hi * np.int16(xq[ox + c16 + j])))
        acc += (_f16(row[o], row[o + 1]) * xd[b]) * np.float32(s)
    return acc


@njit(inline="always")
def _dot_q8_0(row, xq, xd, nb, c16):
    acc = np.float32(0)
    for b in range(nb):
        o = b * 34
        ox = b * 32
        s = np.int32(0)
        for j in range(2 * c16):
            s = np.int32(s + np.int32(np.int16(np.int8(row[o + 2 + j])) * np.int16(xq[ox + j])))
        acc += (_f16(row[o], row[o + 1]) * xd[b]) * np.float32(s)
    return acc


@njit(inline="always")
def _dot_q4_1(row, xq, xd, xs, nb, c16):
    acc = np.float32(0)
    for b in range(nb):
        o = b * 20
        ox = b * 32
        s = np.int32(0)
        for j in range(c16):
            q = row[o + 4 + j]
            lo = np.int16(q & np.uint8(15))
            hi = np.int16(q >> np.uint8(4))
            s = np.int32(s + np.int32(lo * np.int16(xq[ox + j])) + np.int32(hi * np.int16(xq[ox + c16 + j])))
        acc += (_f16(row[o], row[o + 1]) * xd[b]) * np.float32(s)  # two fused steps, as the
        acc += _f16(row[o + 2], row[o + 3]) * xs[b]  # packed kernel: raw == packed, bit for bit
    return acc


@njit(inline="always")
def _dot_q5_1(row, xq, xd, xs, nb, c16):
    acc = np.float32(0)
    for b in range(nb):
        o = b * 24
        ox = b * 32
        qh = _u32(row, o + 4)
        s = np.int32(0)
        for j in range(c16):
            q = row[o + 8 + j]
            lo = np.int16((q & np.uint8(15)) | (((qh >> j) & 1) << 4))
            hi = np.int16((q >> np.uint8(4)) | (((qh >> (j + 16)) & 1) << 4))
            s = np.int32(s + np.int32(lo * np.int16(xq[ox + j])) + np.int32(hi * np.int16(xq[ox + c16 + j])))
        acc += (_f16(row[o], row[o + 1]) * xd[b]) * np.float32(s)  # two fused steps, as the
        acc += _f16(row[o + 2], row[o + 3]) * xs[b]  # packed kernel: raw == packed, bit for bit
    return acc


@njit(inline="always")
def _q32_layout(qt):
    """A block of 32's (bytes, offset of the quants, of the 5th bits, of the min, value offset)."""
    if qt == 2:  # Q4_0
        return 18, 2, 0, 0, 8
    if qt == 3:  # Q4_1
        return 20, 4, 0, 2, 0
    if qt == 6:  # Q5_0
        return 22, 6, 2, 0, 16
    if qt == 7:  # Q5_1
        return 24, 8, 4, 2, 0
    return 34, 2, 0, 0, 0  # Q8_0


@njit(inline="always")
def _q32_value(row, o, qt, j):
    """Value j (< 32) of the block at row[o:], as a signed integer (the type's offset taken off)."""
    if qt == 8:
        return np.int32(np.int8(row[o + 2 + j]))
    size, qo, ho, mo, off = _q32_layout(qt)
    q = row[o + qo + j % 16]
    v = np.int32(q & np.uint8(15)) if j < 16 else np.int32(q >> np.uint8(4))
    if ho:
        v |= np.int32((_u32(row, o + ho) >> np.uint32(j)) & np.uint32(1)) << 4
    return v - off


@njit(inline="always")
def _lane(row, o, qt, xq, ox, m):
    """ggml's lane m of a block: the integer dot of values 4m..4m+3 with the activations."""
    s = np.int32(0)
    for i in range(4 * m, 4 * m + 4):
        s += _q32_value(row, o, qt, i) * np.int32(xq[ox + i])
    return np.float32(s)


@njit(inline="always")
def _dot_q32(row, xq, xd, xs, nb, qt):
    """A row of blocks of 32 against Q8_0/Q8_1 activations in ggml's float order (x86
    `ggml_vec_dot_q4_1_q8_1` and siblings; pack.py's tiles): lane m takes d_w d_x times the
    integer dot of values 4m..4m+3, one FMA chain per lane; the Q4_1/Q5_1 min term m_w s_x is a
    ninth chain; then hsum_float_8 of the lanes, plus that chain."""
    size, qo, ho, mo, off = _q32_layout(qt)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = sm = np.float32(0)
    for b in range(nb):
        o, ox = b * size, b * 32
        d = _f16(row[o], row[o + 1]) * xd[b]
        a0 = _fma32(d, _lane(row, o, qt, xq, ox, 0), a0)
        a1 = _fma32(d, _lane(row, o, qt, xq, ox, 1), a1)
        a2 = _fma32(d, _lane(row, o, qt, xq, ox, 2), a2)
        a3 = _fma32(d, _lane(row, o, qt, xq, ox, 3), a3)
        a4 = _fma32(d, _lane(row, o, qt, xq, ox, 4), a4)
        a5 = _fma32(d, _lane(row, o, qt, xq, ox, 5), a5)
        a6 = _fma32(d, _lane(row, o, qt, xq, ox, 6), a6)
        a7 = _fma32(d, _lane(row, o, qt, xq, ox, 7), a7)
        if mo:
            sm = _fma32(_f16(row[o + mo], row[o + mo + 1]), xs[b], sm)
    return (((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))) + sm


@njit(inline="always")
def _dot_q4_k(row, xq, xd, bsums, nb, c16, has_qh):
    """Q4_K (has_qh False) and Q5_K (True): 8 sub-blocks of 32 with 6-bit scales and mins."""
    acc = np.float32(0)
    ts = 176 if has_qh else 144
    qs0 = 48 if has_qh else 16
    for b in range(nb):
        o = b * ts
        sumi = np.int32(0)
        summ = np.int32(0)
        for c in range(4):  # 64 values: low nibbles are sub-block 2c, high nibbles 2c + 1
            sc0, m0 = _scale_min_k4(row, o + 4, 2 * c)
            sc1, m1 = _scale_min_k4(row, o + 4, 2 * c + 1)
            qo = o + qs0 + 32 * c
            xo = b * QK_K + 64 * c
            s0 = np.int32(0)
            s1 = np.int32(0)
            if has_qh:
                for l in range(2 * c16):
                    q = row[qo + l]
                    h = row[o + 16 + l] >> np.uint8(2 * c)
                    lo = np.int16((q & np.uint8(15)) | ((h & np.uint8(1)) << np.uint8(4)))
                    hi = np.int16((q >> np.uint8(4)) | ((h & np.uint8(2)) << np.uint8(3)))
                    s0 = np.int32(s0 + np.int32(lo * np.int16(xq[xo + l])))
                    s1 = np.int32(s1 + np.int32(hi * np.int16(xq[xo + 32 + l])))
            else:
                for l in range(2 * c16):
                    q = row[qo + l]
                    s0 = np.int32(s0 + np.int32(np.int16(q & np.uint8(15)) * np.int16(xq[xo + l])))
                    s1 = np.int32(s1 + np.int32(np.int16(q >> np.uint8(4)) * np.int16(xq[xo + 32 + l])))
            sumi += sc0 * s0 + sc1 * s1
            g = b * 16 + 4 * c
            summ += m0 * (bsums[g] + bsums[g + 1]) + m1 * (bsums[g + 2] + bsums[g + 3])
        d = xd[b] * _f16(row[o], row[o + 1])
        dmin = xd[b] * _f16(row[o + 2], row[o + 3])
        acc += d * np.float32(sumi)  # two fused steps, in the packed kernel's order
        acc -= dmin * np.float32(summ)
    return acc


@njit(inline="always")
def _dot_q6_k(row, xq, xd, nb, c16):
    acc = np.float32(0)
    for b in range(nb):
        o = b * 210
        sumi = np.int32(0)
        for hh in range(2):  # two halves of 128 values
            qlo = o + 64 * hh
            qho = o + 128 + 32 * hh
            xo = b * QK_K + 128 * hh
            so = o + 192 + 8 * hh
            for g in range(2):  # scale groups of 16
                s0 = np.int32(0)
                s1 = np.int32(0)
                s2 = np.int32(0)
                s3 = np.int32(0)
                for j in range(c16):
                    l = 16 * g + j
                    a = row[qlo + l]
                    c = row[qlo + 32 + l]
                    h = row[qho + l]
                    q1 = np.int16((a & np.uint8(15)) | ((h & np.uint8(3)) << np.uint8(4))) - np.int16(32)
                    q2 = np.int16((c & np.uint8(15)) | ((h & np.uint8(12)) << np.uint8(2))) - np.int16(32)
                    q3 = np.int16((a >> np.uint8(4)) | (h & np.uint8(48))) - np.int16(32)
                    q4 = np.int16((c >> np.uint8(4)) | ((h & np.uint8(192)) >> np.uint8(2))) - np.int16(32)
                    s0 = np.int32(s0 + np.int32(q1 * np.int16(xq[xo + l])))
                    s1 = np.int32(s1 + np.int32(q2 * np.int16(xq[xo + 32 + l])))
                    s2 = np.int32(s2 + np.int32(q3 * np.int16(xq[xo + 64 + l])))
                    s3 = np.int32(s3 + np.int32(q4 * np.int16(xq[xo + 96 + l])))
                sumi += (
                    np.int32(np.int8(row[so + g])) * s0
                    + np.int32(np.int8(row[so + g + 2])) * s1
                    + np.int32(np.int8(row[so + g + 4])) * s2
                    + np.int32(np.int8(row[so + g + 6])) * s3
                )
        acc += (xd[b] * _f16(row[o + 208], row[o + 209])) * np.float32(sumi)
    return acc


# ---------------------------------------------------------------- matmul kernels, one per activation type


# One matvec kernel per weight type, so each inner loop is compiled (and vectorized) on its own;
# T > 1 runs them once per activation row.


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def _mv_q4_0(out, w, N, rs, K, xq, xd, xs, bsums, c16):
    for n in prange(N):
        out[0, n] = _dot_q4_0(w[n * rs :], xq[0], xd[0], K // 32, c16)


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def _mv_q5_0(out, w, N, rs, K, xq, xd, xs, bsums, c16):
    for n in prange(N):
        out[0, n] = _dot_q5_0(w[n * rs :], xq[0], xd[0], K // 32, c16)


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def _mv_q8_0(out, w, N, rs, K, xq, xd, xs, bsums, c16):
    for n in prange(N):
        out[0, n] = _dot_q8_0(w[n * rs :], xq[0], xd[0], K // 32, c16)


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def _mv_q4_1(out, w, N, rs, K, xq, xd, xs, bsums, c16):
    for n in prange(N):
        out[0, n] = _dot_q4_1(w[n * rs :], xq[0], xd[0], xs[0], K // 32, c16)


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def _mv_q5_1(out, w, N, rs, K, xq, xd, xs, bsums, c16):
    for n in prange(N):
        out[0, n] = _dot_q5_1(w[n * rs :], xq[0], xd[0], xs[0], K // 32, c16)


@njit(parallel=True, nogil=True, cache=True)
def _mv_q32_lanes(out, w, N, rs, K, xq, xd, xs, qt):
    """A blocks-of-32 matvec in ggml's float order (`_dot_q32`): the raw rows' llama.cpp parity."""
    for n in prange(N):
        out[0, n] = _dot_q32(w[n * rs :], xq[0], xd[0], xs[0], K // 32, qt)


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def _mv_q4_k(out, w, N, rs, K, xq, xd, xs, bsums, c16):
    for n in prange(N):
        out[0, n] = _dot_q4_k(w[n * rs :], xq[0], xd[0], bsums[0], K // QK_K, c16, False)


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def _mv_q5_k(out, w, N, rs, K, xq, xd, xs, bsums, c16):
    for n in prange(N):
        out[0, n] = _dot_q4_k(w[n * rs :], xq[0], xd[0], bsums[0], K // QK_K, c16, True)


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def _mv_q6_k(out, w, N, rs, K, xq, xd, xs, bsums, c16):
    for n in prange(N):
        out[0, n] = _dot_q6_k(w[n * rs :], xq[0], xd[0], K // QK_K, c16)


# Float weights at T > 1: each row is widened once into per-thread scratch and dotted with the T
# activation rows, four rows per pass so each weight load feeds four FMAs.


@njit(inline="always")
def _dot_rows(out, n, wf, xf, T, K):
    t = 0
    while t + 4 <= T:
        a0 = np.float32(0)
        a1 = np.float32(0)
        a2 = np.float32(0)
        a3 = np.float32(0)
        x0, x1, x2, x3 = xf[t], xf[t + 1], xf[t + 2], xf[t + 3]
        for k in range(K):
            v = wf[k]
            a0 += v * x0[k]
            a1 += v * x1[k]
            a2 += v * x2[k]
            a3 += v * x3[k]
        out[t, n] = a0
        out[t + 1, n] = a1
        out[t + 2, n] = a2
        out[t + 3, n] = a3
        t += 4
    while t < T:
        a0 = np.float32(0)
        x0 = xf[t]
        for k in range(K):
            a0 += wf[k] * x0[k]
        out[t, n] = a0
        t += 1


@njit(inline="always")
def _float_at(qt, row, k):
    """Weight k of an F32 (0), F16 (1) or BF16 (30) row, as float32."""
    if qt == 0:
        return _u32_as_f32(_u32(row, 4 * k))
    if qt == 1:
        return _f16(row[2 * k], row[2 * k + 1])
    return _u32_as_f32(
        (np.uint32(row[2 * k]) << np.uint32(16)) | (np.uint32(row[2 * k + 1]) << np.uint32(24))
    )


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def _mm_float(out, x, w, N, rs, qt, T, K, wf):
    """F32/F16/BF16 weights: widen to f32 and dot with f32 activations."""
    for n in prange(N):
        row = w[n * rs :]
        if T == 1:
            acc = np.float32(0)
            for k in range(K):
                acc += _float_at(qt, row, k) * x[0, k]
            out[0, n] = acc
        else:
            buf = wf[numba.get_thread_id()]
            for k in range(K):
                buf[k] = _float_at(qt, row, k)
            _dot_rows(out, n, buf, x, T, K)


# ---------------------------------------------------------------- dequantization (exact numpy twin)


@njit(inline="always")
def _deq_row(qt, row, dst, c16, with_min):
    """Row of blocks -> float32, with the float operations of formats.py in the same order (no fastmath)."""
    K = dst.shape[0]
    if qt == 0 or qt == 1 or qt == 30:
        for k in range(K):
            dst[k] = _float_at(qt, row, k)
    elif qt == 2 or qt == 3 or qt == 6 or qt == 7:
        ts, qo, ho, mo, off = _q32_layout(qt)
        for b in range(K // 32):
            o = b * ts
            d = _f16(row[o], row[o + 1])
            m = _f16(row[o + mo], row[o + mo + 1]) if mo and with_min else np.float32(0)
            qh = _u32(row, o + ho) if ho else np.uint32(0)
            for j in range(c16):
                q = row[o + qo + j]
                lo = np.int32((q & np.uint8(15)) | (((qh >> j) & 1) << 4))
                hi = np.int32((q >> np.uint8(4)) | (((qh >> (j + 16)) & 1) << 4))
                if mo:  # Q4_1, Q5_1: d q + m
                    dst[b * 32 + j] = d * np.float32(lo) + m
                    dst[b * 32 + 16 + j] = d * np.float32(hi) + m
                else:  # Q4_0, Q5_0: d (q - offset)
                    dst[b * 32 + j] = d * np.float32(lo - off)
                    dst[b * 32 + 16 + j] = d * np.float32(hi - off)
    elif qt == 8 or qt == 9:
        ts = 34 if qt == 8 else 36
        qo = 2 if qt == 8 else 4
        for b in range(K // 32):
            o = b * ts
            d = _f16(row[o], row[o + 1])
            for j in range(32):
                dst[b * 32 + j] = np.float32(np.int8(row[o + qo + j])) * d
    elif qt == 12 or qt == 13:
        has_qh = qt == 13
        ts = 176 if has_qh else 144
        qs0 = 48 if has_qh else 16
        for b in range(K // QK_K):
            o = b * ts
            d = _f16(row[o], row[o + 1])
            dmin = _f16(row[o + 2], row[o + 3])
            for j in range(8):
                sc, mn = _scale_min_k4(row, o + 4, j)
                ds = d * np.float32(sc)
                dm = dmin * np.float32(mn)
                for l in range(32):
                    q = row[o + qs0 + 32 * (j // 2) + l]
                    q = (q >> np.uint8(4)) if j & 1 else (q & np.uint8(15))
                    if has_qh:
                        q |= ((row[o + 16 + l] >> np.uint8(j)) & np.uint8(1)) << np.uint8(4)
                    dst[b * QK_K + 32 * j + l] = ds * np.float32(q) - dm
    elif qt == 14:
        for b in range(K // QK_K):
            o = b * 210
            d = _f16(row[o + 208], row[o + 209])
            for hh in range(2):
                for l in range(32):
                    a = row[o + 64 * hh + l]
                    c = row[o + 64 * hh + 32 + l]
                    h = row[o + 128 + 32 * hh + l]
                    q1 = np.int32((a & np.uint8(15)) | ((h & np.uint8(3)) << np.uint8(4))) - 32
                    q2 = np.int32((c & np.uint8(15)) | ((h & np.uint8(12)) << np.uint8(2))) - 32
                    q3 = np.int32((a >> np.uint8(4)) | (h & np.uint8(48))) - 32
                    q4 = np.int32((c >> np.uint8(4)) | ((h & np.uint8(192)) >> np.uint8(2))) - 32
                    x0 = b * QK_K + 128 * hh + l
                    so = o + 192 + 8 * hh + l // 16
                    dst[x0] = (d * np.float32(np.int8(row[so]))) * np.float32(q1)
                    dst[x0 + 32] = (d * np.float32(np.int8(row[so + 2]))) * np.float32(q2)
                    dst[x0 + 64] = (d * np.float32(np.int8(row[so + 4]))) * np.float32(q3)
                    dst[x0 + 96] = (d * np.float32(np.int8(row[so + 6]))) * np.float32(q4)
    else:  # Q8_K (15)
        for b in range(K // QK_K):
            o = b * 292
            d = _u32_as_f32(_u32(row, o))
            for j in range(QK_K):
                dst[b * QK_K + j] = d * np.float32(np.int8(row[o + 4 + j]))


@njit(parallel=True, nogil=True, cache=True)
def _dequantize_rows(out, w, rs, qt, c16):
    for n in prange(out.shape[0]):
        _deq_row(qt, w[n * rs :], out[n], c16, True)


@njit(parallel=True, nogil=True, cache=True)
def _get_rows(out, w, rs, qt, ids, c16):
    for i in prange(ids.shape[0]):
        _deq_row(qt, w[np.int64(ids[i]) * rs :], out[i], c16, True)


@njit(parallel=True, nogil=True, cache=True)
def _get_rows_packed(out, p, qt, nb, rec, ids, tmp, c16):
    """Rows of a packed weight: rebuild each raw GGUF row in per-thread scratch, then decode it."""
    for i in prange(ids.shape[0]):
        buf = tmp[numba.get_thread_id()]
        _pk._unpack_row(buf, p, np.int64(ids[i]), qt, nb, rec)
        _deq_row(qt, buf, out[i], c16, True)


# ---------------------------------------------------------------- public API

_Q8_0_WEIGHTS = frozenset((QType.Q4_0, QType.Q5_0, QType.Q8_0))
_Q8_1_WEIGHTS = frozenset((QType.Q4_1, QType.Q5_1))
_Q8_K_WEIGHTS = frozenset((QType.Q4_K, QType.Q5_K, QType.Q6_K))
_FLOAT_WEIGHTS = frozenset((QType.F32, QType.F16, QType.BF16))
_MATVEC = {
    QType.Q4_0: _mv_q4_0,
    QType.Q5_0: _mv_q5_0,
    QType.Q8_0: _mv_q8_0,
    QType.Q4_1: _mv_q4_1,
    QType.Q5_1: _mv_q5_1,
    QType.Q4_K: _mv_q4_k,
    QType.Q5_K: _mv_q5_k,
    QType.Q6_K: _mv_q6_k,
}
_MATMUL_TYPES = _Q8_0_WEIGHTS | _Q8_1_WEIGHTS | _Q8_K_WEIGHTS | _FLOAT_WEIGHTS


def _flat_rows(w: np.ndarray, qt: QType, K: int) -> tuple[np.ndarray, int]:
    """`w` as a 1-D C-contiguous byte view and its row stride: one compiled kernel serves
    contiguous and column-sliced weights alike, with unit-stride loads in both."""
    nbytes = K // BLOCK_SIZE[qt] * TYPE_SIZE[qt]
    if w.ndim == 2 and w.flags.c_contiguous and w.dtype == np.uint8 and w.shape[1] == nbytes:
        return w.reshape(-1), nbytes
    rs = w.strides[0] if w.ndim == 2 else 0
    if (
        K % BLOCK_SIZE[qt]
        or w.ndim != 2
        or w.shape[1] != nbytes
        or w.dtype != np.uint8
        or w.strides[1] != 1
        or rs < nbytes
    ):
        raise ValueError(
            f"{qt.name} weight rows of {K} values need a uint8 [N, {nbytes}] array with a contiguous "
            f"last dim, got {w.dtype} {w.shape} strides {w.strides}"
        )
    span = (w.shape[0] - 1) * rs + nbytes if w.shape[0] else 0
    return np.lib.stride_tricks.as_strided(w, shape=(span,), strides=(1,)), rs


def matmul(
    out: np.ndarray,
    x: np.ndarray,
    w: np.ndarray | PackedWeight,
    qtype: int,
    scratch: MatmulScratch,
    same_input: bool = False,
) -> None:
    """out[T, N] = x[T, K] @ W[N, K]^T with W stored as GGUF blocks: raw rows (uint8 [N, row bytes],
    column slices allowed) or a `pack`ed weight, which runs several times faster.

    Activations are quantized into `scratch` as ggml does for the weight type; nothing is allocated.
    Every activation row gets the same per-block integer arithmetic, so prefill equals decode.
    `same_input=True` promises that x holds the same values as in the previous call on this scratch
    (k and v after q, up after gate): a packed weight then reuses that quantization if its
    activation type matches.
    """
    qt = qtype if type(qtype) is QType else as_qtype(qtype)
    T, K = x.shape
    packed = None
    if type(w) is PackedWeight:
        if w.qtype != qt or w.n_cols != K:
            raise ValueError(f"matmul: {w!r} used as {qt.name} with x {x.shape}")
        if w.interleaved:
            packed = w.data
        else:
            w = w.data
    if qt not in _MATMUL_TYPES:
        supported = ", ".join(q.name for q in sorted(_MATMUL_TYPES))
        raise UnsupportedError(f"matmul on block type {qt.name} is not supported; supported: {supported}")
    if not (1 <= T <= scratch.max_rows and K <= scratch.max_k) or out.shape != (T, w.shape[0]):
        raise ValueError(
            f"matmul shapes: x {x.shape}, w {w.shape}, out {out.shape}, scratch for "
            f"{scratch.max_rows} rows of {scratch.max_k}"
        )
    s = scratch
    N = w.shape[0]
    if packed is not None:
        _packed_matmul(out, x, packed, qt, s, same_input)
        return
    s.held = None  # the paths below overwrite xq
    wf, rs = _flat_rows(w, qt, K)
    if qt in _FLOAT_WEIGHTS:
        _mm_float(out, x, wf, N, rs, int(qt), T, K, s.wf)
        return
    if qt in _Q8_K_WEIGHTS:
        _quantize_q8_k(x, s.xq, s.xd, s.bsums)
    else:
        _quantize_q8_0(x, s.xq, s.xd, s.xs, qt in _Q8_1_WEIGHTS)
    lanes = s.ggml_order and qt not in _Q8_K_WEIGHTS
    mv = _MATVEC[qt]
    for t in range(T):  # one matvec per row: the raw layout has no blocked product
        u = slice(t, t + 1)
        if lanes:
            _mv_q32_lanes(out[u], wf, N, rs, K, s.xq[u], s.xd[u], s.xs[u], int(qt))
        else:
            mv(out[u], wf, N, rs, K, s.xq[u], s.xd[u], s.xs[u], s.bsums[u], 16)


def _packed_matmul(out, x, packed, qt: QType, s: MatmulScratch, same_input: bool) -> None:
    T, K = x.shape
    N = out.shape[1]
    kind = 2 if qt in _Q8_K_WEIGHTS else 1 if qt in _Q8_1_WEIGHTS else 0  # Q8_K, Q8_1, Q8_0
    if not (same_input and s.held == (kind, T, K)):
        if kind == 2:
            (_quantize_q8_k if T == 1 else _quantize_q8_k_rows)(x, s.xq, s.xd, s.bsums)
        else:
            (_quantize_q8_0 if T == 1 else _quantize_q8_0_rows)(x, s.xq, s.xd, s.xs, kind == 1)
        s.held, s.derived = (kind, T, K), None
    # llama.cpp picks its K-quant kernel by the batch it evaluates: `ggml_batch` (>= 8: its tiled
    # kernel's order) when the caller set one, else this call's rows
    mode = 0 if not s.ggml_order else 1 if (s.ggml_batch or T) >= 8 else 2
    if kind == 2:
        if s.derived != (qt == QType.Q6_K):
            _pk.pair_sums(s.bsums, T, K, int(qt), s.bsp)
            s.derived = qt == QType.Q6_K
    elif not mode:  # (parity's lanes take their offsets off with the activations themselves)
        off = _pk.Q32_OFFSET[qt]
        if off and s.derived != off:
            _pk.block_sums(s.xq, T, K, off, s.xsum)
            s.derived = off
    if kind == 2:
        mm = _pk._mm_k_tiled if mode == 1 else _pk._mm_k_lanes if mode == 2 else _pk._mm_k
    else:
        mm = _pk._mm_q32_lanes if mode else _pk._mm_q32
    mm(
        out, packed, N, K, T, int(qt), _pk._REC[qt], s.xq_flat, s.max_k, s.xd_flat, s.xs_flat,
        s.xsum_flat, s.bsp_flat, s.accs,
    )  # fmt: skip


def dequantize_rows(out: np.ndarray, w: np.ndarray, qtype: int) -> None:
    """out[N, K] float32 = every row of `w` (uint8 [N, row bytes]) decoded: formats.dequantize in numba."""
    qt = as_qtype(qtype)
    if out.shape[0] != w.shape[0]:
        raise ValueError(f"dequantize_rows: out {out.shape} for {w.shape[0]} rows")
    wf, rs = _flat_rows(w, qt, out.shape[1])
    _dequantize_rows(out, wf, rs, int(qt), 16)


def get_rows(out: np.ndarray, w: np.ndarray | PackedWeight, qtype: int, ids: np.ndarray) -> None:
    """out[i] = row ids[i] of `w` decoded to float32 (embedding lookup); ids int32 or int64.

    `w` may be packed, so a tied embedding / output matrix is held once, in the fast layout.
    """
    qt = as_qtype(qtype)
    if out.shape[0] != len(ids) or (len(ids) and not (0 <= ids.min() and ids.max() < w.shape[0])):
        raise ValueError(f"get_rows: out {out.shape}, ids in [{ids.min()}, {ids.max()}] of {w.shape[0]} rows")
    if type(w) is PackedWeight:
        if w.qtype != qt or w.n_cols != out.shape[1]:
            raise ValueError(f"get_rows: {w!r} read as {qt.name} rows of {out.shape[1]}")
        if w.interleaved:
            tmp = np.empty((numba.config.NUMBA_NUM_THREADS, w.shape[1]), np.uint8)  # a few KB
            nb = w.n_cols // BLOCK_SIZE[qt]
            _get_rows_packed(out, w.data, int(qt), nb, _pk._REC[qt], ids, tmp, 16)
            return
        w = w.data
    wf, rs = _flat_rows(w, qt, out.shape[1])
    _get_rows(out, wf, rs, int(qt), ids, 16)
