"""Row-interleaved weight layout for `kernels.matmul`, repacked once at load (like llama.cpp's Q4_0x8).

Rows are taken 16 at a time. For each group of 16 rows and each weight block (32 values, or a 256-value
K-quant super-block) one record holds the 16 rows' fp16 scales, then their quant bits in 64-byte
chunks. A chunk is one 512-bit vector: a 4-byte lane per row, each lane holding 4 consecutive values
of that row (8 for 4-bit data: the low nibbles are values k..k+3, the high nibbles k+4..k+7; the
top bits of 5- and 6-bit values sit in separate 64-byte planes and are or'ed in at bit 4).
`vpdpbusd` (AVX512-VNNI) multiplies such a chunk by 4 broadcast int8 activations and adds the 4
products into each row's int32 lane, so the SIMD lanes run across output rows: no horizontal sums.
Records are exactly the size of 16 GGUF blocks: Q4_K and Q5_K keep ggml's packed 6-bit scales,
which the kernel unpacks in registers.

The arithmetic is ggml's: exact integer sums per block (per sub-block for K-quants), times the float
scales; for llama.cpp parity, blocks of 32 can also keep ggml's 8 float lanes per row
(`_make_tile_lanes`) and so sum in its order. Quant values are stored unsigned (Q8_0 as q + 128,
Q4_0 without its -8, ...), and the offset comes back exactly as offset * (sum of the int8
activations it multiplies).
"""

from __future__ import annotations

import llvmlite.binding as llb
import numba
import numpy as np
from edgert.quant.formats import BLOCK_SIZE, QK_K, TYPE_SIZE, QType, as_qtype
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

G = 16  # rows per group: one 512-bit vector of int32 lanes
# numba's threading layer, called by its LLVM symbols: numba's own jit-side
# `set_parallel_chunksize` and `get_num_threads` go through ctypes pointers, which its cache
# cannot store. The symbols exist once numba's thread pool has started (get_num_threads starts
# it), and are declared as numba's parfor lowering declares them: both land in one LLVM module.
numba.get_num_threads()
_num_threads = types.ExternalFunction("get_num_threads", types.intp())
_get_chunksize = types.ExternalFunction("get_parallel_chunksize", types.uintp())
_set_chunksize = types.ExternalFunction("set_parallel_chunksize", types.void(types.uintp))
HAVE_VNNI = bool(llb.get_host_cpu_features().get("avx512vnni", False))

# record bytes per (group, block); other types keep their raw rows
_REC = {
    QType.Q4_0: G * 18,
    QType.Q4_1: G * 20,
    QType.Q5_0: G * 22,
    QType.Q5_1: G * 24,
    QType.Q8_0: G * 34,
    QType.Q4_K: G * 144,
    QType.Q5_K: G * 176,
    QType.Q6_K: G * 210,
}


class PackedWeight:
    """A weight matrix repacked for `matmul`. `shape` is that of the raw GGUF rows (N, row bytes)."""

    def __init__(self, data: np.ndarray, qtype: QType, n_rows: int, n_cols: int, interleaved: bool):
        self.data = data  # uint8: records (interleaved) or the raw rows, contiguous
        self.qtype = qtype
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.interleaved = interleaved
        self.shape = (n_rows, n_cols // BLOCK_SIZE[qtype] * TYPE_SIZE[qtype])

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __repr__(self) -> str:
        return f"PackedWeight({self.qtype.name}, {self.n_rows}x{self.n_cols}, {self.nbytes} bytes)"


def packed_nbytes(qtype: int, n_rows: int, n_cols: int) -> int | None:
    """Bytes of the records `pack` makes of n_rows x n_cols values of this type (rows padded to
    whole groups of 16); None when it keeps the raw rows (no record layout, or no AVX512-VNNI)."""
    qt = as_qtype(qtype)
    if qt not in _REC or not HAVE_VNNI or n_rows == 0:
        return None
    return (n_rows + G - 1) // G * (n_cols // BLOCK_SIZE[qt]) * _REC[qt]


def resident_nbytes(qtype: int, n_rows: int, row_bytes: int) -> int:
    """Bytes `pack` holds for n_rows rows of `row_bytes` raw bytes: the records where the type
    has them (the blocks' own size, once the rows are padded to whole groups of 16), else the rows."""
    qt = as_qtype(qtype)
    n = packed_nbytes(qt, n_rows, row_bytes // TYPE_SIZE[qt] * BLOCK_SIZE[qt])
    return n_rows * row_bytes if n is None else n


def pack(w: np.ndarray, qtype: int, chunk_rows: int = 8192, done=None) -> PackedWeight:
    """Copy raw GGUF rows (uint8 [N, row bytes], possibly a strided view) into the layout `matmul` runs
    fastest on. Types without a row-interleaved kernel (or CPUs without AVX512-VNNI) keep their rows.

    Rows are packed `chunk_rows` at a time and `done(row_start, row_stop)` is called after each
    chunk, so a caller packing from a file mapping can release the source pages as it goes and
    never hold a large tensor twice.
    """
    qt = as_qtype(qtype)
    if w.ndim != 2 or w.dtype != np.uint8 or w.strides[1] != 1 or w.shape[1] % TYPE_SIZE[qt]:
        raise ValueError(f"pack: need uint8 [N, row bytes] {qt.name} rows, got {w.dtype} {w.shape}")
    N = w.shape[0]
    K = w.shape[1] // TYPE_SIZE[qt] * BLOCK_SIZE[qt]
    if qt not in _REC or not HAVE_VNNI or N == 0:
        out = np.empty(w.shape, np.uint8)
        for r0 in range(0, N, chunk_rows):
            out[r0 : r0 + chunk_rows] = w[r0 : r0 + chunk_rows]
            if done is not None:
                done(r0, min(N, r0 + chunk_rows))
        return PackedWeight(out, qt, N, K, False)
    nb = K // BLOCK_SIZE[qt]
    ng = (N + G - 1) // G
    rec = _REC[qt]
    out = np.zeros(ng * nb * rec, np.uint8)
    rs = w.strides[0]
    step = max(G, chunk_rows // G * G)  # whole groups per chunk: each group's records are contiguous
    for r0 in range(0, N, step):
        sub = w[r0 : min(N, r0 + step)]
        n = sub.shape[0]
        flat = np.lib.stride_tricks.as_strided(sub, shape=((n - 1) * rs + sub.shape[1],), strides=(1,))
        _pack_rows(out[r0 // G * nb * rec :], flat, n, rs, int(qt), nb, rec)
        if done is not None:
            done(r0, r0 + n)
    return PackedWeight(out, qt, N, K, True)


# ---------------------------------------------------------------- packing (one pass, parallel over groups)


@njit(inline="always")
def _put_nib(dst, o, r, v, vo):
    """32 values v[vo:vo+32] (< 16 after masking) of row r into the 4 nibble chunks at dst[o:]."""
    for c in range(4):
        for j in range(4):
            dst[o + 64 * c + 4 * r + j] = (v[vo + 8 * c + j] & 15) | ((v[vo + 8 * c + 4 + j] & 15) << 4)


@njit(inline="always")
def _put_h1(dst, o, r, v, vo):
    """Bit 4 of v[vo:vo+32]: byte j of row r's lane, bit m = value 4m + j."""
    for j in range(4):
        b = 0
        for m in range(8):
            b |= ((v[vo + 4 * m + j] >> 4) & 1) << m
        dst[o + 4 * r + j] = b


@njit(inline="always")
def _put_h2(dst, o, r, v, vo):
    """Bits 4-5 of v[vo:vo+32]: plane p, byte j of row r's lane, bits 2i..2i+1 = value 4(4p + i) + j."""
    for p in range(2):
        for j in range(4):
            b = 0
            for i in range(4):
                b |= ((v[vo + 4 * (4 * p + i) + j] >> 4) & 3) << (2 * i)
            dst[o + 64 * p + 4 * r + j] = b


@njit(inline="always")
def _put16(dst, o, r, src, so):
    """An fp16 (2 bytes) of row r into a [16] fp16 vector at dst[o:]."""
    dst[o + 2 * r] = src[so]
    dst[o + 2 * r + 1] = src[so + 1]


@njit(inline="always")
def _b(s, i):
    return np.int64(s[i])


@njit(parallel=True, nogil=True, cache=True)
def _pack_rows(dst, w, N, rs, qt, nb, rec):
    ts = 18 if qt == 2 else 20 if qt == 3 else 22 if qt == 6 else 24 if qt == 7 else 34
    if qt == 12:
        ts = 144
    elif qt == 13:
        ts = 176
    elif qt == 14:
        ts = 210
    ng = (N + 15) // 16
    for g in prange(ng):
        v = np.empty(256, np.int32)  # one block's unsigned quant values, ggml order
        for r in range(min(16, N - g * 16)):
            row = w[(g * 16 + r) * rs :]
            for b in range(nb):
                s = row[b * ts :]
                o = (g * nb + b) * rec
                if qt == 8:  # Q8_0: d | 8 chunks of q + 128
                    _put16(dst, o, r, s, 0)
                    for m in range(8):
                        for j in range(4):
                            dst[o + 32 + 64 * m + 4 * r + j] = _b(s, 2 + 4 * m + j) ^ 0x80
                elif qt <= 7:  # Q4_0, Q4_1, Q5_0, Q5_1: d | m | qh plane | nibbles
                    qo = 2 if qt == 2 else 4 if qt == 3 else 6 if qt == 6 else 8
                    qh = 0
                    if qt >= 6:
                        qh = (
                            (_b(s, qo - 4))
                            | ((_b(s, qo - 3)) << 8)
                            | ((_b(s, qo - 2)) << 16)
                            | ((_b(s, qo - 1)) << 24)
                        )
                    for j in range(16):
                        v[j] = (_b(s, qo + j) & 15) | (((qh >> j) & 1) << 4)
                        v[j + 16] = (_b(s, qo + j) >> 4) | (((qh >> (j + 16)) & 1) << 4)
                    _put16(dst, o, r, s, 0)
                    p = 32
                    if qt == 3 or qt == 7:
                        _put16(dst, o + 32, r, s, 2)
                        p = 64
                    if qt >= 6:
                        _put_h1(dst, o + p, r, v, 0)
                        p += 64
                    _put_nib(dst, o + p, r, v, 0)
                elif qt == 12 or qt == 13:  # d | dmin | 12x16 packed scales | (qh planes) | nibbles
                    _put16(dst, o, r, s, 0)
                    _put16(dst, o + 32, r, s, 2)
                    for k in range(12):  # ggml's 6-bit scales and mins as they are: the kernel unpacks them
                        dst[o + 64 + 16 * k + r] = _b(s, 4 + k)
                    qs0 = 48 if qt == 13 else 16
                    for j in range(8):
                        for l in range(32):
                            q = _b(s, qs0 + 32 * (j // 2) + l)
                            q = (q >> 4) if j & 1 else (q & 15)
                            if qt == 13:
                                q |= ((_b(s, 16 + l) >> j) & 1) << 4
                            v[32 * j + l] = q
                    p = 256
                    if qt == 13:
                        for j in range(8):
                            _put_h1(dst, o + p + 64 * j, r, v, 32 * j)
                        p += 512
                    for j in range(8):
                        _put_nib(dst, o + p + 256 * j, r, v, 32 * j)
                else:  # Q6_K: d | 16x16 int8 scales | 8 x 2 high-bit planes | 8 x nibbles
                    _put16(dst, o, r, s, 208)
                    for j in range(16):
                        dst[o + 32 + 16 * j + r] = _b(s, 192 + j)
                    for hh in range(2):
                        for l in range(32):
                            a = _b(s, 64 * hh + l)
                            c = _b(s, 64 * hh + 32 + l)
                            h = _b(s, 128 + 32 * hh + l)
                            k = 128 * hh + l
                            v[k] = (a & 15) | ((h & 3) << 4)
                            v[k + 32] = (c & 15) | (((h >> 2) & 3) << 4)
                            v[k + 64] = (a >> 4) | (((h >> 4) & 3) << 4)
                            v[k + 96] = (c >> 4) | (((h >> 6) & 3) << 4)
                    for j in range(8):
                        _put_h2(dst, o + 288 + 128 * j, r, v, 32 * j)
                        _put_nib(dst, o + 1312 + 256 * j, r, v, 32 * j)


@njit(inline="always")
def _get_nib(v, vo, p, o, r):
    """Inverse of _put_nib (low 4 bits only)."""
    for c in range(4):
        for j in range(4):
            b = np.int64(p[o + 64 * c + 4 * r + j])
            v[vo + 8 * c + j] = b & 15
            v[vo + 8 * c + 4 + j] = b >> 4


@njit(inline="always")
def _get_h(v, vo, p, o, r, bits):
    """Inverse of _put_h1 (bits 1) and _put_h2 (bits 2): or the high bits into v[vo:vo+32]."""
    for m in range(8):
        for j in range(4):
            if bits == 1:
                h = (np.int64(p[o + 4 * r + j]) >> m) & 1
            else:
                h = (np.int64(p[o + 64 * (m // 4) + 4 * r + j]) >> (2 * (m % 4))) & 3
            v[vo + 4 * m + j] |= h << 4


@njit(inline="always")
def _unpack_row(dst, p, n, qt, nb, rec):
    """Raw GGUF row n (bytes into dst) from packed records p: the exact inverse of _pack_rows."""
    ts = 18 if qt == 2 else 20 if qt == 3 else 22 if qt == 6 else 24 if qt == 7 else 34
    ts = 144 if qt == 12 else 176 if qt == 13 else 210 if qt == 14 else ts
    g, r = n // 16, n % 16
    v = np.empty(256, np.int64)
    for b in range(nb):
        o = (g * nb + b) * rec
        s = b * ts
        if qt == 8:
            dst[s], dst[s + 1] = p[o + 2 * r], p[o + 2 * r + 1]
            for m in range(8):
                for j in range(4):
                    dst[s + 2 + 4 * m + j] = p[o + 32 + 64 * m + 4 * r + j] ^ 0x80
        elif qt <= 7:
            dst[s], dst[s + 1] = p[o + 2 * r], p[o + 2 * r + 1]
            q = 32
            if qt == 3 or qt == 7:
                dst[s + 2], dst[s + 3] = p[o + 32 + 2 * r], p[o + 33 + 2 * r]
                q = 64
            _get_nib(v, 0, p, o + q + (64 if qt >= 6 else 0), r)
            qo = 2 if qt == 2 else 4 if qt == 3 else 6 if qt == 6 else 8
            if qt >= 6:
                _get_h(v, 0, p, o + q, r, 1)
                qh = 0
                for k in range(32):
                    qh |= (v[k] >> 4) << k
                for i in range(4):
                    dst[s + qo - 4 + i] = (qh >> (8 * i)) & 255
            for j in range(16):
                dst[s + qo + j] = (v[j] & 15) | ((v[j + 16] & 15) << 4)
        elif qt == 12 or qt == 13:
            for i in range(4):
                dst[s + i] = p[o + 32 * (i // 2) + 2 * r + i % 2]
            for k in range(12):
                dst[s + 4 + k] = p[o + 64 + 16 * k + r]
            for j in range(8):
                _get_nib(v, 32 * j, p, o + (768 if qt == 13 else 256) + 256 * j, r)
                if qt == 13:
                    _get_h(v, 32 * j, p, o + 256 + 64 * j, r, 1)
            qs0 = 48 if qt == 13 else 16
            for c in range(4):
                for l in range(32):
                    dst[s + qs0 + 32 * c + l] = (v[64 * c + l] & 15) | ((v[64 * c + 32 + l] & 15) << 4)
            if qt == 13:
                for l in range(32):
                    h = 0
                    for j in range(8):
                        h |= (v[32 * j + l] >> 4) << j
                    dst[s + 16 + l] = h
        else:
            dst[s + 208], dst[s + 209] = p[o + 2 * r], p[o + 2 * r + 1]
            for j in range(16):
                dst[s + 192 + j] = p[o + 32 + 16 * j + r]
            for j in range(8):
                _get_nib(v, 32 * j, p, o + 1312 + 256 * j, r)
                _get_h(v, 32 * j, p, o + 288 + 128 * j, r, 2)
            for hh in range(2):
                for l in range(32):
                    k = 128 * hh + l
                    dst[s + 64 * hh + l] = (v[k] & 15) | ((v[k + 64] & 15) << 4)
                    dst[s + 64 * hh + 32 + l] = (v[k + 32] & 15) | ((v[k + 96] & 15) << 4)
                    h = (
                        (v[k] >> 4)
                        | ((v[k + 32] >> 4) << 2)
                        | ((v[k + 64] >> 4) << 4)
                        | ((v[k + 96] >> 4) << 6)
                    )
                    dst[s + 128 + 32 * hh + l] = h


@njit(parallel=True, nogil=True, cache=True)
def _unpack_rows(dst, p, qt, nb, rec):
    for n in prange(dst.shape[0]):
        _unpack_row(dst[n], p, n, qt, nb, rec)


def unpack(w: PackedWeight) -> np.ndarray:
    """The raw GGUF rows (uint8 [N, row bytes]) back from a packed weight; for tests and export."""
    if not w.interleaved:
        return w.data.copy()
    out = np.zeros(w.shape, np.uint8)
    _unpack_rows(out, w.data, int(w.qtype), w.n_cols // BLOCK_SIZE[w.qtype], _REC[w.qtype])
    return out


# ---------------------------------------------------------------- register tiles (LLVM IR)
# A tile intrinsic computes one record (16 rows x one block) against NT tokens at once: the
# record's quant vectors are loaded and unpacked once and reused for every token, and NT
# independent integer chains keep the vpdpbusd pipeline full. Per (row, token) the float steps
# are exactly those of a one-token call (fmul of the scales, sitofp of the integer sum, one fma
# per term, blocks in order), so prefill and decode stay bit-identical.

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16I32 = ir.VectorType(_I32, 16)
_V16I8 = ir.VectorType(_I8, 16)
_V16F32 = ir.VectorType(ir.FloatType(), 16)
_V16F16 = ir.VectorType(ir.HalfType(), 16)
NT, NT32 = 4, 8  # tokens per register tile, K-quants and blocks of 32 (8 K-quant tokens spill registers)


def _const(v):
    return ir.Constant(_V16I32, [v] * 16)


def _splat(builder, v, vty):
    u = builder.insert_element(ir.Constant(vty, ir.Undefined), v, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(u, ir.Constant(vty, ir.Undefined), zeros)


def _call(builder, name, ty, *args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [a.type for a in args]), name)
    return builder.call(fn, list(args))


class _Args:
    """An intrinsic's arguments in codegen: integers as i64 IR values, arrays as element pointers."""

    def __init__(self, context, builder, sig, args):
        self.b = builder
        self.int = [context.cast(builder, a, t, types.int64) if isinstance(t, types.Integer) else None
                    for a, t in zip(args, sig.args, strict=True)]  # fmt: skip
        self.data = [context.make_array(t)(context, builder, a).data if isinstance(t, types.Array) else None
                     for a, t in zip(args, sig.args, strict=True)]  # fmt: skip

    def off(self, *terms):
        """Sum of terms: ints, argument indices given as ("arg", i), or (i, k) meaning arg i * k."""
        b = self.b
        tot = ir.Constant(_I64, 0)
        for t in terms:
            if isinstance(t, int):
                v = ir.Constant(_I64, t)
            elif t[1] == 1:
                v = self.int[t[0]]
            else:
                v = b.mul(self.int[t[0]], ir.Constant(_I64, t[1]))
            tot = b.add(tot, v)
        return tot

    def ptr(self, i, off, elty):
        return self.b.bitcast(self.b.gep(self.data[i], [off]), elty.as_pointer())

    def load(self, i, off, elty):
        return self.b.load(self.ptr(i, off, elty), align=1)


def _quants(A, o_nib, o_hi, bits):
    """The 8 vectors of one 32-value block of 16 rows: vector m holds values 4m..4m+3 of each row.

    bits 8: 8 byte chunks at w[o_nib]; bits 4/5/6: 4 nibble chunks at w[o_nib] (low nibbles are
    vector 2c, high ones 2c + 1), plus 1 or 2 high-bit planes at w[o_hi] for bits 5 and 6.
    """
    b = A.b
    if bits == 8:
        return [A.load(0, b.add(o_nib, ir.Constant(_I64, 64 * m)), _V16I32) for m in range(8)]
    hp = [A.load(0, b.add(o_hi, ir.Constant(_I64, 64 * i)), _V16I32) for i in range({4: 0, 5: 1, 6: 2}[bits])]
    qs = []
    for c in range(4):
        v = A.load(0, b.add(o_nib, ir.Constant(_I64, 64 * c)), _V16I32)
        for h in range(2):
            m = 2 * c + h
            q = b.and_(b.lshr(v, _const(4)) if h else v, _const(0x0F0F0F0F))
            if bits == 5:
                hb = b.and_(b.lshr(hp[0], _const(m)), _const(0x01010101))
                q = b.or_(q, b.shl(hb, _const(4)))
            elif bits == 6:
                hb = b.and_(b.lshr(hp[m // 4], _const(2 * (m % 4))), _const(0x03030303))
                q = b.or_(q, b.shl(hb, _const(4)))
            qs.append(q)
    return qs


def _dot(A, qs, ms, xoff, nchain):
    """Integer sums over vectors qs[m], m in ms, times the int8 activations xq[xoff + 4m:] (arg 2)."""
    b = A.b
    chains = [ir.Constant(_V16I32, None)] * nchain  # more than one for a lone token: vpdpbusd latency
    for n, m in enumerate(ms):
        x = b.load(A.ptr(2, b.add(xoff, ir.Constant(_I64, 4 * m)), _I32), align=1)
        c = n % nchain
        chains[c] = _call(b, "llvm.x86.avx512.vpdpbusd.512", _V16I32, chains[c], qs[m], _splat(b, x, _V16I32))
    return chains[0] if nchain == 1 else b.add(chains[0], chains[1])


def _pairs(A, so, signed, shift=0):
    """Two [16] per-row byte vectors a, b at w[so:] as int16 pairs: lane r = (a[r], b[r]) << shift."""
    return _zip_pairs(A, A.load(0, so, ir.VectorType(_I8, 32)), signed, shift)


def _zip_pairs(A, v, signed, shift=0):
    """`_pairs` of the 32 bytes v (a[16] then b[16]) already in a register."""
    b = A.b
    v = b.sext(v, ir.VectorType(_I16, 32)) if signed else b.zext(v, ir.VectorType(_I16, 32))
    if shift:
        v = b.shl(v, ir.Constant(ir.VectorType(_I16, 32), [shift] * 32))
    v = b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(ir.VectorType(_I32, 32), _ZIP))
    return b.bitcast(v, _V16I32)


_ZIP = [k // 2 + 16 * (k % 2) for k in range(32)]
_CAT = ir.Constant(ir.VectorType(_I32, 32), list(range(32)))  # two [16] vectors, one after the other


def _k_scale(A, j, mins=False):
    """Q4_K/Q5_K: the scale (or min) of sub-block j for the record's 16 rows, a [16] byte vector,
    unpacked from the record's 12 planes of ggml's 6-bit codes (plane k: byte k of every row's
    12, as `get_scale_min_k4` reads them). Stored packed, a record is the size of its blocks;
    unpacking costs two loads and a few byte-vector operations, next to the products that use
    it (unpacked all up front, the 16 vectors would stay live through the whole record)."""
    b = A.b

    def plane(k):
        return A.load(0, A.off((1, 1), 64 + 16 * k), _V16I8)

    def c(v):
        return ir.Constant(_V16I8, [v] * 16)

    if j < 4:
        return b.and_(plane(j + 4 if mins else j), c(63))
    high = b.shl(b.lshr(plane(j if mins else j - 4), c(6)), c(4))  # the top two bits, as bits 4-5
    low = b.lshr(plane(j + 4), c(4)) if mins else b.and_(plane(j + 4), c(15))
    return b.or_(low, high)


def _dpwssd(A, acc, pairs, ai, off):
    """acc += pairs . (the int16 pair at array arg ai [off]): exact products of 16-bit halves, as int32."""
    b = A.b
    x = _splat(b, b.load(A.ptr(ai, off, _I32), align=1), _V16I32)
    return _call(b, "llvm.x86.avx512.vpdpwssd.512", _V16I32, acc, pairs, x)


def _f16x16(A, o):
    return A.b.fpext(A.load(0, o, _V16F16), _V16F32)


def _fma_acc(A, acc, scale, s, iv):
    """acc += (scale * s) * float(iv): the one rounding order every kernel path uses."""
    b = A.b
    d = b.fmul(scale, _splat(b, s, _V16F32))
    return _call(b, "llvm.fma.v16f32", _V16F32, d, b.sitofp(iv, _V16F32), acc)


# q32 record layouts: (bits, nibble offset, high-plane offset, offset of the stored-unsigned values, has min)
_Q32 = {2: (4, 32, 0, 8, False), 3: (4, 64, 0, 0, True), 6: (5, 96, 32, 16, False),
        7: (5, 128, 64, 0, True), 8: (8, 32, 0, 128, False)}  # fmt: skip
Q32_OFFSET = {QType(q): v[3] for q, v in _Q32.items()}


def _make_tile_q32(qt, nt):
    """tile(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss): one Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 record at
    w[o:] against tokens i < nt (activations xq[xo + i*xk:], scalars at [si + i*ss] of xd, xs, xsum),
    adding into acc[ao + 16i : ao + 16i + 16]: one FMA chain per row, the fast order."""
    bits, nib, hi, off, has_min = _Q32[qt]
    nc = 2 if nt == 1 else 1

    def typer(typingctx, w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss):
        def codegen(context, builder, sig, args):
            A = _Args(context, builder, sig, args)
            b = builder
            o = A.int[1]
            qs = _quants(A, A.off((1, 1), nib), A.off((1, 1), hi), bits)
            d16 = _f16x16(A, o)
            m16 = _f16x16(A, A.off((1, 1), 32)) if has_min else None
            for i in range(nt):
                s = A.off((10, 1), (11, i)) if i else A.int[10]
                isum = _dot(A, qs, range(8), A.off((3, 1), (4, i)) if i else A.int[3], nc)
                if off:  # xsum holds off * (sum of the block's activations), see `block_sums`
                    isum = b.sub(isum, _splat(b, b.load(A.ptr(9, s, _I32), align=1), _V16I32))
                ap = A.ptr(5, A.off((6, 1), 16 * i), _V16F32)
                acc = _fma_acc(A, b.load(ap, align=1), d16, b.load(A.ptr(7, s, ir.FloatType())), isum)
                if has_min:
                    sv = _splat(b, b.load(A.ptr(8, s, ir.FloatType())), _V16F32)
                    acc = _call(b, "llvm.fma.v16f32", _V16F32, m16, sv, acc)
                b.store(acc, ap, align=1)
            return context.get_dummy_value()

        return types.none(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss), codegen

    return intrinsic(typer)


LANES = 9  # accumulators per token of a blocks-of-32 tile: ggml's 8 lanes, then the Q4_1/Q5_1 min sum
ACC_Q32 = 16 * LANES  # floats per token


def _make_tile_lanes(qt, nt):
    """tile(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss): one Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 record at
    w[o:] against tokens i < nt (activations xq[xo + i*xk:], scalars at [si + i*ss] of xd, xs; xsum unused),
    adding into acc[ao + ACC_Q32 i:], in ggml's order (`ggml_vec_dot_q4_1_q8_1` and its siblings on
    x86, and tinyBLAS's for a batch): lane m (m < 8) of each row takes the integer dot of values
    4m..4m+3 times d_w * d_x, one FMA per block; the min term (Q4_1/Q5_1) m_w * s_x is a ninth FMA
    chain. `_store_lanes` adds them up as ggml does. A stored-unsigned offset is taken off each lane
    exactly, with a vpdpbusd of the offset bytes against the same activations."""
    bits, nib, hi, off, has_min = _Q32[qt]

    def typer(typingctx, w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss):
        def codegen(context, builder, sig, args):
            A = _Args(context, builder, sig, args)
            b = builder
            o = A.int[1]
            qs = _quants(A, A.off((1, 1), nib), A.off((1, 1), hi), bits)
            d16 = _f16x16(A, o)
            m16 = _f16x16(A, A.off((1, 1), 32)) if has_min else None
            zero = ir.Constant(_V16I32, None)
            offv = _const(off * 0x01010101) if off else None
            for i in range(nt):
                s = A.off((10, 1), (11, i)) if i else A.int[10]
                xo = A.off((3, 1), (4, i)) if i else A.int[3]
                d = b.fmul(d16, _splat(b, b.load(A.ptr(7, s, ir.FloatType())), _V16F32))
                for m in range(8):
                    xv = _splat(
                        b, b.load(A.ptr(2, b.add(xo, ir.Constant(_I64, 4 * m)), _I32), align=1), _V16I32
                    )
                    iv = _call(b, "llvm.x86.avx512.vpdpbusd.512", _V16I32, zero, qs[m], xv)
                    if off:
                        iv = b.sub(iv, _call(b, "llvm.x86.avx512.vpdpbusd.512", _V16I32, zero, offv, xv))
                    ap = A.ptr(5, A.off((6, 1), ACC_Q32 * i + 16 * m), _V16F32)
                    acc = _call(b, "llvm.fma.v16f32", _V16F32, d, b.sitofp(iv, _V16F32), b.load(ap, align=1))
                    b.store(acc, ap, align=1)
                if has_min:
                    ap = A.ptr(5, A.off((6, 1), ACC_Q32 * i + 128), _V16F32)
                    sv = _splat(b, b.load(A.ptr(8, s, ir.FloatType())), _V16F32)
                    b.store(_call(b, "llvm.fma.v16f32", _V16F32, m16, sv, b.load(ap, align=1)), ap, align=1)
            return context.get_dummy_value()

        return types.none(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss), codegen

    return intrinsic(typer)


K_LANES = 12  # accumulators per token of a K-quant lanes tile: ggml's 8 lanes, then 4 min lanes
ACC_MAX = 16 * K_LANES  # the most accumulator floats a token takes (the matmul scratch's stride)


def _make_tile_k(qt, nt, order="fast"):
    """tile(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi): one Q4_K/Q5_K/Q6_K record at w[o:] against
    tokens i < nt (Q8_K activations xq[xo + i*xk:], scale xd[si + i*ss], int16 pairs of activation
    sums bsp[pi + i*ss:], see `pair_sums`), adding into acc[ao:].

    order "fast": one FMA chain per row (acc[ao + 16i:][:16]): acc += (d_w d_x) float(isum), then
    the mins. The llama.cpp parity orders (Q4_K, Q6_K):
    - "tiled", ggml's tiled K-quant matmul (batches of 8 tokens or more): r = float(isum) d_w,
      r -= d_min float(imin) (one rounding), acc = fma(r, d_x, acc); 16 floats per token;
    - "lanes", `ggml_vec_dot_q4_K_q8_K` / `_q6_K_q8_K` (fewer than 8): 8 integer lanes per row,
      lane m holding values 4m..4m+3 of every sub-block of 32 times its scale (Q6_K: minus 32
      scale times the activation sums of sub-block m's two groups of 16), each lane an FMA chain
      of d_x d_w times its float; Q4_K's mins in 4 more chains (sub-blocks 2k and 2k+1 each);
      K_LANES x 16 floats per token, summed by `_store_lanes`."""
    nc = 2 if nt == 1 else 1
    lanes = order == "lanes"
    per = 16 * K_LANES if lanes else 16

    def typer(typingctx, w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi):
        def codegen(context, builder, sig, args):
            A = _Args(context, builder, sig, args)
            b = builder
            f32 = ir.FloatType()
            xo = [A.off((3, 1), (4, i)) for i in range(nt)]
            po = [A.off((11, 1), (9, i)) for i in range(nt)]

            def pair(i, k):
                return b.add(po[i], ir.Constant(_I64, k))

            def bytes16(so, signed):
                v = A.load(0, A.off((1, 1), so), _V16I8)
                return b.sext(v, _V16I32) if signed else b.zext(v, _V16I32)

            def dp(i, qv, xoff, m):  # one lane's integer dot: values 4m..4m+3 at xq[xoff]
                x = b.load(A.ptr(2, b.add(xoff, ir.Constant(_I64, 4 * m)), _I32), align=1)
                return _call(b, "llvm.x86.avx512.vpdpbusd.512", _V16I32, zero, qv, _splat(b, x, _V16I32))

            zero = ir.Constant(_V16I32, None)
            nl = 8 if lanes else 1
            isc = [[zero] * nl for _ in range(nt)]
            imn = [[zero] * 4 for _ in range(nt)]
            if qt == 14:  # the -32 of every Q6_K value: (32 scale) (-sum x) over each pair of groups of 16
                for k in range(8):
                    sp = _pairs(A, A.off((1, 1), 32 + 32 * k), True, 5)
                    for i in range(nt):
                        if lanes:  # lane k takes sub-block k's two groups (ggml's q8sclsub)
                            isc[i][k] = _dpwssd(A, isc[i][k], sp, 10, pair(i, k))
                        else:
                            isc[i][0] = _dpwssd(A, isc[i][0], sp, 10, pair(i, k))
            else:  # the mins: min * (sum x) over sub-blocks 2k and 2k + 1
                for k in range(4):
                    both = b.shuffle_vector(_k_scale(A, 2 * k, True), _k_scale(A, 2 * k + 1, True), _CAT)
                    mp = _zip_pairs(A, both, False)
                    for i in range(nt):
                        kk = k if lanes else 0
                        imn[i][kk] = _dpwssd(A, imn[i][kk], mp, 10, pair(i, k))
            for j in range(8):  # 32 values at a time
                xj = [b.add(xo[i], ir.Constant(_I64, 32 * j)) for i in range(nt)]
                if qt == 14:  # Q6_K: two sub-blocks of 16 with int8 scales
                    qs = _quants(A, A.off((1, 1), 1312 + 256 * j), A.off((1, 1), 288 + 128 * j), 6)
                    sa, sb = bytes16(32 + 32 * j, True), bytes16(48 + 32 * j, True)
                    for i in range(nt):
                        if lanes:
                            for m in range(8):
                                isc[i][m] = b.add(
                                    isc[i][m], b.mul(sa if m < 4 else sb, dp(i, qs[m], xj[i], m))
                                )
                        else:
                            d = b.add(
                                b.mul(sa, _dot(A, qs, range(4), xj[i], nc)),
                                b.mul(sb, _dot(A, qs, range(4, 8), xj[i], nc)),
                            )
                            isc[i][0] = b.add(isc[i][0], d)
                else:  # Q4_K/Q5_K: u8 scale per sub-block of 32
                    nib = A.off((1, 1), (768 if qt == 13 else 256) + 256 * j)
                    qs = _quants(A, nib, A.off((1, 1), 256 + 64 * j), 5 if qt == 13 else 4)
                    sc = b.zext(_k_scale(A, j), _V16I32)
                    for i in range(nt):
                        if lanes:
                            for m in range(8):
                                isc[i][m] = b.add(isc[i][m], b.mul(sc, dp(i, qs[m], xj[i], m)))
                        else:
                            isc[i][0] = b.add(isc[i][0], b.mul(sc, _dot(A, qs, range(8), xj[i], nc)))
            d16 = _f16x16(A, A.int[1])
            m16 = _f16x16(A, A.off((1, 1), 32)) if qt != 14 else None
            fma = "llvm.fma.v16f32"
            for i in range(nt):
                xd = b.load(A.ptr(7, A.off((8, 1), (9, i)), f32))

                def at(v, i=i):
                    return A.ptr(5, A.off((6, 1), per * i + 16 * v), _V16F32)

                if order == "fast":
                    acc = _fma_acc(A, b.load(at(0), align=1), d16, xd, isc[i][0])
                    if qt != 14:
                        acc = _fma_acc(A, acc, m16, b.fneg(xd), imn[i][0])
                    b.store(acc, at(0), align=1)
                elif order == "tiled":
                    r = b.fmul(b.sitofp(isc[i][0], _V16F32), d16)
                    if qt != 14:
                        r = _call(b, fma, _V16F32, b.fneg(m16), b.sitofp(imn[i][0], _V16F32), r)
                    acc = _call(b, fma, _V16F32, r, _splat(b, xd, _V16F32), b.load(at(0), align=1))
                    b.store(acc, at(0), align=1)
                else:
                    d = b.fmul(_splat(b, xd, _V16F32), d16)
                    for m in range(8):
                        acc = _call(b, fma, _V16F32, d, b.sitofp(isc[i][m], _V16F32), b.load(at(m), align=1))
                        b.store(acc, at(m), align=1)
                    if qt != 14:
                        dm = b.fmul(_splat(b, b.fneg(xd), _V16F32), m16)
                        for k in range(4):
                            acc = _call(
                                b, fma, _V16F32, dm, b.sitofp(imn[i][k], _V16F32), b.load(at(8 + k), align=1)
                            )
                            b.store(acc, at(8 + k), align=1)
            return context.get_dummy_value()

        return types.none(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi), codegen

    return intrinsic(typer)


_t4_0, _t4_1, _t5_0, _t5_1, _t8_0 = (_make_tile_q32(q, 1) for q in (2, 3, 6, 7, 8))
_T4_0, _T4_1, _T5_0, _T5_1, _T8_0 = (_make_tile_q32(q, NT32) for q in (2, 3, 6, 7, 8))
_l4_0, _l4_1, _l5_0, _l5_1, _l8_0 = (_make_tile_lanes(q, 1) for q in (2, 3, 6, 7, 8))
_L4_0, _L4_1, _L5_0, _L5_1, _L8_0 = (_make_tile_lanes(q, NT32) for q in (2, 3, 6, 7, 8))
_t4_k, _t5_k, _t6_k = (_make_tile_k(q, 1) for q in (12, 13, 14))
_T4_k, _T5_k, _T6_k = (_make_tile_k(q, NT) for q in (12, 13, 14))
# llama.cpp parity (Q4_K, Q6_K): ggml's tiled order for batches of 8 or more, its vec_dot lanes below
_g4_k, _g6_k = (_make_tile_k(q, 1, "tiled") for q in (12, 14))
_G4_k, _G6_k = (_make_tile_k(q, NT, "tiled") for q in (12, 14))
_v4_k, _v6_k = (_make_tile_k(q, 1, "lanes") for q in (12, 14))
_V4_k, _V6_k = (_make_tile_k(q, NT, "lanes") for q in (12, 14))


# ---------------------------------------------------------------- matmul on packed records

# Groups are handed to threads dynamically, CHUNKS runs of them per thread's share: on a shared or
# throttled CPU a descheduled thread then delays the matmul by one run, not by half its rows.
CHUNKS = 4
TC = 64  # tokens per chunk: its accumulators (4 KB; 36-48 KB for parity's lanes) and activations stay cached


@njit(inline="always")
def _store_out(out, acc, g, N, t0, tc):
    n0 = g * 16
    for t in range(tc):
        for r in range(min(16, N - n0)):
            out[t0 + t, n0 + r] = acc[16 * t + r]


@njit(inline="always")
def _store_lanes(out, acc, g, N, t0, tc, per):
    """A parity tile's sums (`per` floats a token): ggml's hsum_float_8 of the 8 lanes,
    ((0+4) + (2+6)) + ((1+5) + (3+7)), plus what follows them: the blocks of 32's min-term chain
    (ACC_Q32), or the K-quants' 4 min lanes reduced (0 + 2) + (1 + 3), as
    `ggml_vec_dot_q4_K_q8_K` ends (ACC_MAX; Q6_K's stay 0)."""
    n0 = g * 16
    for t in range(tc):
        a = per * t
        for r in range(min(16, N - n0)):
            x = a + r
            r0 = acc[x] + acc[x + 64]
            r1 = acc[x + 16] + acc[x + 80]
            r2 = acc[x + 32] + acc[x + 96]
            r3 = acc[x + 48] + acc[x + 112]
            if per == ACC_Q32:
                rest = acc[x + 128]
            else:
                rest = (acc[x + 128] + acc[x + 160]) + (acc[x + 144] + acc[x + 176])
            out[t0 + t, n0 + r] = ((r0 + r2) + (r1 + r3)) + rest


@njit(inline="always")
def _tile(qt, nt, mode, w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss, bsp, pi):
    """One record block of 16 rows against nt tokens (NT / NT32, or 1), for any packed type:
    blocks of 32 take the per-block scales xd, Q8_1 sums xs and integer sums xsum at si; the
    K-quants take xd at si and the int16 sum pairs bsp at pi. mode: 0 the fast order; 1, 2
    llama.cpp parity for a batch of 8 tokens or more, or fewer: blocks of 32 take
    `_make_tile_lanes` in both, K-quants `_make_tile_k`'s "tiled" or "lanes" (Q5_K the fast
    order)."""
    if qt == 12 or qt == 13 or qt == 14:
        if mode == 1 and qt != 13:
            _tile_k_parity(qt, nt, False, w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
        elif mode == 2 and qt != 13:
            _tile_k_parity(qt, nt, True, w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
        elif nt == NT:
            if qt == 12:
                _T4_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
            elif qt == 13:
                _T5_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
            else:
                _T6_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
        elif qt == 12:
            _t4_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
        elif qt == 13:
            _t5_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
        else:
            _t6_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
    elif mode:
        _tile_q32_lanes(qt, nt, w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    elif nt == NT32:
        if qt == 2:
            _T4_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
        elif qt == 3:
            _T4_1(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
        elif qt == 6:
            _T5_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
        elif qt == 7:
            _T5_1(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
        else:
            _T8_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    elif qt == 2:
        _t4_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    elif qt == 3:
        _t4_1(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    elif qt == 6:
        _t5_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    elif qt == 7:
        _t5_1(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    else:
        _t8_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)


@njit(inline="always")
def _tile_k_parity(qt, nt, small, w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi):
    if small:
        if nt == NT:
            if qt == 12:
                _V4_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
            else:
                _V6_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
        elif qt == 12:
            _v4_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
        else:
            _v6_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
    elif nt == NT:
        if qt == 12:
            _G4_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
        else:
            _G6_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
    elif qt == 12:
        _g4_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)
    else:
        _g6_k(w, o, xq, xo, xk, acc, ao, xd, si, ss, bsp, pi)


@njit(inline="always")
def _tile_q32_lanes(qt, nt, w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss):
    if nt == NT32:
        if qt == 2:
            _L4_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
        elif qt == 3:
            _L4_1(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
        elif qt == 6:
            _L5_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
        elif qt == 7:
            _L5_1(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
        else:
            _L8_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    elif qt == 2:
        _l4_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    elif qt == 3:
        _l4_1(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    elif qt == 6:
        _l5_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    elif qt == 7:
        _l5_1(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)
    else:
        _l8_0(w, o, xq, xo, xk, acc, ao, xd, xs, xsum, si, ss)


@njit(inline="always")
def _tiles(qt, nt, mode, per, t_lo, t_hi, t0, b, w, o, bs, xq, xk, acc, xd, xs, xsum, ss, bsp):
    """Tokens t_lo..t_hi of a chunk starting at t0, nt at a time, against block b's records
    (`per` accumulator floats per token)."""
    for t in range(t_lo, t_hi, nt):
        u = t0 + t
        _tile(
            qt,
            nt,
            mode,
            w,
            o,
            xq,
            u * xk + bs * b,
            xk,
            acc,
            per * t,
            xd,
            xs,
            xsum,
            u * ss + b,
            ss,
            bsp,
            u * ss + 8 * b,
        )


@njit(inline="always")
def _mm(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs, kq, mode):
    """out[T, N] over packed records (`rec` bytes per group and block); kq: a K-quant type
    (a literal at each entry point below, as is mode, so each is compiled with its own tiles only).
    mode: 0 one FMA chain per row (fast); 1, 2 ggml's orders for a batch of 8 tokens or more,
    or fewer (llama.cpp parity, see `_tile`).
    xq is the flat int8 activations, row stride xk; xd, xs, xsum and bsp (`block_sums`,
    `pair_sums`) are flat [rows, xk // 32 + 1]. Each 16-row group goes to one thread, which
    runs the tokens in chunks of TC through register tiles of NT (K-quants) or NT32 tokens."""
    bs = QK_K if kq else 32
    nt = NT if kq else NT32
    if not kq:
        per = ACC_Q32 if mode else 16  # accumulator floats per token
    else:
        per = ACC_MAX if mode == 2 and qt != 13 else 16
    nb = K // bs
    ss = xk // 32 + 1
    # groups go to threads dynamically, in runs of about 1/CHUNKS of a thread's share; set here,
    # not by the caller: numba's Python-level setter takes two locks per call (3 us a matmul)
    chunk = _get_chunksize()
    _set_chunksize(np.uintp(max(1, N // (16 * CHUNKS * _num_threads()))))
    for g in prange((N + 15) // 16):
        acc = accs[numba.get_thread_id()]
        for t0 in range(0, T, TC):
            tc = min(TC, T - t0)
            acc[: per * tc] = 0
            full = tc - tc % nt
            for b in range(nb):
                o = (g * nb + b) * rec
                _tiles(qt, nt, mode, per, 0, full, t0, b, w, o, bs, xq, xk, acc, xd, xs, xsum, ss, bsp)
                _tiles(qt, 1, mode, per, full, tc, t0, b, w, o, bs, xq, xk, acc, xd, xs, xsum, ss, bsp)
            if per == 16:
                _store_out(out, acc, g, N, t0, tc)
            else:
                _store_lanes(out, acc, g, N, t0, tc, per)
    _set_chunksize(chunk)


@njit(parallel=True, nogil=True, cache=True)
def _mm_q32(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs):
    """`_mm` for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (blocks of 32)."""
    _mm(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs, False, 0)


@njit(parallel=True, nogil=True, cache=True)
def _mm_q32_lanes(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs):
    """`_mm_q32` in ggml's float order (llama.cpp parity)."""
    _mm(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs, False, 1)


@njit(parallel=True, nogil=True, cache=True)
def _mm_k(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs):
    """`_mm` for Q4_K/Q5_K/Q6_K super-blocks against Q8_K activations."""
    _mm(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs, True, 0)


@njit(cache=True, nogil=True)
def pair_sums(bsums, T, K, qt, bsp):
    """Activation sums as int16 pairs for the K tiles' vpdpwssd: per super-block b, slot 8b + k holds
    (s[2k], s[2k+1]) with s the sums of 32 (Q4_K/Q5_K, k < 4) or minus the sums of 16 (Q6_K)."""
    for t in range(T):
        for b in range(K // QK_K):
            for k in range(8 if qt == 14 else 4):
                if qt == 14:
                    lo, hi = -bsums[t, 16 * b + 2 * k], -bsums[t, 16 * b + 2 * k + 1]
                else:
                    lo = bsums[t, 16 * b + 4 * k] + bsums[t, 16 * b + 4 * k + 1]
                    hi = bsums[t, 16 * b + 4 * k + 2] + bsums[t, 16 * b + 4 * k + 3]
                bsp[t, 8 * b + k] = (np.int64(lo) & 0xFFFF) | (np.int64(hi) << 16)


@njit(cache=True, nogil=True)
def block_sums(xq, T, K, off, xsum):
    """off * (integer sum) of each 32-block of the quantized activations: the stored-unsigned offset."""
    for t in range(T):
        for b in range(K // 32):
            s = 0
            for j in range(32):
                s += np.int32(xq[t, 32 * b + j])
            xsum[t, b] = off * s


@njit(parallel=True, nogil=True, cache=True)
def _mm_k_tiled(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs):
    """`_mm_k` in ggml's tiled kernel's order, for a batch of 8 tokens or more (llama.cpp parity)."""
    _mm(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs, True, 1)


@njit(parallel=True, nogil=True, cache=True)
def _mm_k_lanes(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs):
    """`_mm_k` in `ggml_vec_dot_*`'s lanes, for a batch of fewer than 8 (llama.cpp parity)."""
    _mm(out, w, N, K, T, qt, rec, xq, xk, xd, xs, xsum, bsp, accs, True, 2)
