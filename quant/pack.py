"""Row-interleaved weight layout for `kernels.matmul`, repacked once at load (like llama.cpp's Q4_0x8).

Rows are taken 16 at a time. For each group of 16 rows and each weight block (32 values, or a 256-value
K-quant super-block) one record holds the 16 rows' fp16 scales, then their quant bits in 64-byte
chunks. A chunk is one 512-bit vector: a 4-byte lane per row, each lane holding 4 consecutive values
of that row (8 for 4-bit data: the low nibbles are values k..k+3, the high nibbles k+4..k+7; the
top bits of 5- and 6-bit values sit in separate 64-byte planes and are or'ed in at bit 4).
`vpdpbusd` (AVX512-VNNI) multiplies such a chunk by 4 broadcast int8 activations and adds the 4
products into each row's int32 lane, so the SIMD lanes run across output rows: no horizontal sums.
Records are the size of 16 GGUF blocks (K-quants add 4 bytes a block: their 6-bit scales are unpacked).

The arithmetic is ggml's: exact integer sums per block (per sub-block for K-quants), times the float
scales. Quant values are stored unsigned (Q8_0 as q + 128, Q4_0 without its -8, ...), and the offset
comes back exactly as offset * (sum of the block's int8 activations).
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
HAVE_VNNI = bool(llb.get_host_cpu_features().get("avx512vnni", False))

# record bytes per (group, block); other types keep their raw rows
_REC = {
    QType.Q4_0: G * 18,
    QType.Q4_1: G * 20,
    QType.Q5_0: G * 22,
    QType.Q5_1: G * 24,
    QType.Q8_0: G * 34,
    QType.Q4_K: G * 148,
    QType.Q5_K: G * 180,
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


@njit(parallel=True, cache=True)
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
                elif qt == 12 or qt == 13:  # d | dmin | 8x16 scales | 8x16 mins | (qh planes) | nibbles
                    _put16(dst, o, r, s, 0)
                    _put16(dst, o + 32, r, s, 2)
                    qs0 = 48 if qt == 13 else 16
                    for j in range(8):
                        if j < 4:
                            sc = _b(s, 4 + j) & 63
                            mn = _b(s, 8 + j) & 63
                        else:
                            sc = (_b(s, 8 + j) & 0x0F) | ((_b(s, j) >> 6) << 4)
                            mn = (_b(s, 8 + j) >> 4) | ((_b(s, 4 + j) >> 6) << 4)
                        dst[o + 64 + 16 * j + r] = sc
                        dst[o + 192 + 16 * j + r] = mn
                        for l in range(32):
                            q = _b(s, qs0 + 32 * (j // 2) + l)
                            q = (q >> 4) if j & 1 else (q & 15)
                            if qt == 13:
                                q |= ((_b(s, 16 + l) >> j) & 1) << 4
                            v[32 * j + l] = q
                    p = 320
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
            for j in range(8):
                sc = np.int64(p[o + 64 + 16 * j + r])
                mn = np.int64(p[o + 192 + 16 * j + r])
                if j < 4:
                    dst[s + 4 + j] = (dst[s + 4 + j] & 0xC0) | sc
                    dst[s + 8 + j] = (dst[s + 8 + j] & 0xC0) | mn
                else:
                    dst[s + 8 + j] = (sc & 15) | ((mn & 15) << 4)
                    dst[s + j] = (dst[s + j] & 63) | ((sc >> 4) << 6)
                    dst[s + 4 + j] = (dst[s + 4 + j] & 63) | ((mn >> 4) << 6)
            for j in range(8):
                _get_nib(v, 32 * j, p, o + (832 if qt == 13 else 320) + 256 * j, r)
                if qt == 13:
                    _get_h(v, 32 * j, p, o + 320 + 64 * j, r, 1)
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


@njit(parallel=True, cache=True)
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


# ---------------------------------------------------------------- vector intrinsics (LLVM IR)
# Each works on 16 lanes at byte offsets into 1-D arrays; LLVM keeps the vectors in registers.

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V16I32 = ir.VectorType(_I32, 16)
_V16I8 = ir.VectorType(_I8, 16)
_V16F32 = ir.VectorType(ir.FloatType(), 16)
_V16F16 = ir.VectorType(ir.HalfType(), 16)


def _ptr(context, builder, aryty, ary, off, offty, elty):
    data = context.make_array(aryty)(context, builder, ary).data
    off = context.cast(builder, off, offty, types.intp)
    return builder.bitcast(builder.gep(data, [off]), elty.as_pointer())


def _load(context, builder, sig, args, i, j, elty):
    """Load an `elty` from array args[i] at byte/element offset args[j] (unaligned)."""
    return builder.load(_ptr(context, builder, sig.args[i], args[i], args[j], sig.args[j], elty), align=1)


def _store(context, builder, sig, args, i, j, val):
    p = _ptr(context, builder, sig.args[i], args[i], args[j], sig.args[j], val.type)
    builder.store(val, p, align=1)


def _splat(builder, v, vty):
    u = builder.insert_element(ir.Constant(vty, ir.Undefined), v, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(u, ir.Constant(vty, ir.Undefined), zeros)


def _const(v):
    return ir.Constant(_V16I32, [v] * 16)


def _dpbusd(builder, acc, a, b):
    fnty = ir.FunctionType(_V16I32, [_V16I32] * 3)
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, a, b])


def _xb(context, builder, sig, args, m):
    """Activations x[xo + 4m : xo + 4m + 4] (args 3, 4) broadcast to all 16 lanes."""
    x = _ptr(context, builder, sig.args[3], args[3], args[4], sig.args[4], _I8)
    p = builder.bitcast(builder.gep(x, [ir.Constant(ir.IntType(64), 4 * m)]), _I32.as_pointer())
    return _splat(builder, builder.load(p, align=1), _V16I32)


def _make_dot(bits, scales):
    """Intrinsic dot(w, wo, ho, x, xo, dst, do, so) over 32 values of 16 rows.

    bits 8: 8 chunks of unsigned bytes at w[wo:]; bits 4/5/6: 4 nibble chunks at w[wo:] plus, for 5 and
    6, high-bit planes at w[ho:]. scales None: dst[do:do+16] = the int32 sums. scales "u8"/"i8":
    dst[do:do+16] += scale * sum, with per-row scales at w[so:so+16] (bits 6: two sub-blocks of 16
    values, scales at w[so:] and w[so+16:]).
    """

    def typer(typingctx, w, wo, ho, x, xo, dst, do, so):
        def codegen(context, builder, sig, args):
            def chunk(i):
                p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _I8)
                p = builder.gep(p, [ir.Constant(ir.IntType(64), 64 * i)])
                return builder.load(builder.bitcast(p, _V16I32.as_pointer()), align=1)

            def plane(i):
                p = _ptr(context, builder, sig.args[0], args[0], args[2], sig.args[2], _I8)
                p = builder.gep(p, [ir.Constant(ir.IntType(64), 64 * i)])
                return builder.load(builder.bitcast(p, _V16I32.as_pointer()), align=1)

            nacc = 2 if bits == 6 else 1
            acc = [ir.Constant(_V16I32, None)] * nacc
            if bits == 8:
                for m in range(8):
                    acc[0] = _dpbusd(builder, acc[0], chunk(m), _xb(context, builder, sig, args, m))
            else:
                hp = [plane(i) for i in range({4: 0, 5: 1, 6: 2}[bits])]
                for c in range(4):
                    v = chunk(c)
                    for h in range(2):
                        m = 2 * c + h
                        q = builder.lshr(v, _const(4)) if h else v
                        q = builder.and_(q, _const(0x0F0F0F0F))
                        if bits == 5:
                            hb = builder.and_(builder.lshr(hp[0], _const(m)), _const(0x01010101))
                            q = builder.or_(q, builder.shl(hb, _const(4)))
                        elif bits == 6:
                            hb = builder.lshr(hp[m // 4], _const(2 * (m % 4)))
                            hb = builder.and_(hb, _const(0x03030303))
                            q = builder.or_(q, builder.shl(hb, _const(4)))
                        a = m // 4 if bits == 6 else 0
                        acc[a] = _dpbusd(builder, acc[a], q, _xb(context, builder, sig, args, m))
            if scales is None:
                _store(context, builder, sig, args, 5, 6, acc[0])
                return context.get_dummy_value()
            dp = _ptr(context, builder, sig.args[5], args[5], args[6], sig.args[6], _V16I32)
            tot = builder.load(dp, align=1)
            sp = _ptr(context, builder, sig.args[0], args[0], args[7], sig.args[7], _I8)
            for a in range(nacc):
                p = builder.gep(sp, [ir.Constant(ir.IntType(64), 16 * a)])
                sc = builder.load(builder.bitcast(p, _V16I8.as_pointer()), align=1)
                sc = builder.sext(sc, _V16I32) if scales == "i8" else builder.zext(sc, _V16I32)
                tot = builder.add(tot, builder.mul(sc, acc[a]))
            builder.store(tot, dp, align=1)
            return context.get_dummy_value()

        return types.none(w, wo, ho, x, xo, dst, do, so), codegen

    return intrinsic(typer)


_dot8 = _make_dot(8, None)
_dot4 = _make_dot(4, None)
_dot5 = _make_dot(5, None)
_dot4_u8 = _make_dot(4, "u8")
_dot5_u8 = _make_dot(5, "u8")
_dot6_i8 = _make_dot(6, "i8")


def _make_acc_sc(signed):
    """acc_sc(dst, do, w, so, s): dst[do:do+16] += (per-row byte scales at w[so:so+16]) * s (int32)."""

    def typer(typingctx, dst, do, w, so, s):
        def codegen(context, builder, sig, args):
            dp = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V16I32)
            sc = _load(context, builder, sig, args, 2, 3, _V16I8)
            sc = builder.sext(sc, _V16I32) if signed else builder.zext(sc, _V16I32)
            sv = _arg_splat(context, builder, sig, args, 4, types.int32, _V16I32)
            builder.store(builder.add(builder.load(dp, align=1), builder.mul(sc, sv)), dp, align=1)
            return context.get_dummy_value()

        return types.none(dst, do, w, so, s), codegen

    return intrinsic(typer)


_acc_u8 = _make_acc_sc(False)
_acc_i8 = _make_acc_sc(True)


def _fma(builder, a, b, c):
    fnty = ir.FunctionType(_V16F32, [_V16F32] * 3)
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _arg_splat(context, builder, sig, args, i, ty, vty):
    """Scalar argument i, cast to `ty`, in all lanes of `vty`."""
    return _splat(builder, context.cast(builder, args[i], sig.args[i], ty), vty)


@intrinsic
def _acc_f16(typingctx, acc, ao, w, so, isum, io, s, ioff):
    """acc[ao:ao+16] += (fp16 scales at w[so:] * s) * float(isum[io:io+16] - ioff)."""

    def codegen(context, builder, sig, args):
        ap = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V16F32)
        d = builder.fpext(_load(context, builder, sig, args, 2, 3, _V16F16), _V16F32)
        d = builder.fmul(d, _arg_splat(context, builder, sig, args, 6, types.float32, _V16F32))
        iv = _load(context, builder, sig, args, 4, 5, _V16I32)
        iv = builder.sub(iv, _arg_splat(context, builder, sig, args, 7, types.int32, _V16I32))
        builder.store(_fma(builder, d, builder.sitofp(iv, _V16F32), builder.load(ap, align=1)), ap, align=1)
        return context.get_dummy_value()

    return types.none(acc, ao, w, so, isum, io, s, ioff), codegen


@intrinsic
def _acc_f16s(typingctx, acc, ao, w, so, s):
    """acc[ao:ao+16] += fp16 values at w[so:] * s (the Q4_1/Q5_1 min term)."""

    def codegen(context, builder, sig, args):
        ap = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V16F32)
        m = builder.fpext(_load(context, builder, sig, args, 2, 3, _V16F16), _V16F32)
        sv = _arg_splat(context, builder, sig, args, 4, types.float32, _V16F32)
        builder.store(_fma(builder, m, sv, builder.load(ap, align=1)), ap, align=1)
        return context.get_dummy_value()

    return types.none(acc, ao, w, so, s), codegen


# ---------------------------------------------------------------- matmul on packed records


@njit(inline="always")
def _store_out(out, acc, g, N, T):
    n0 = g * 16
    for t in range(T):
        for r in range(min(16, N - n0)):
            out[t, n0 + r] = acc[16 * t + r]


@njit(parallel=True, cache=True)
def _mm_q32(out, w, N, K, T, qt, xq, xk, xd, xs, xsum, accs, isums):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (blocks of 32); xq is the flat int8 activations, row stride xk."""
    nb = K // 32
    rec = 288 if qt == 2 else 320 if qt == 3 else 352 if qt == 6 else 384 if qt == 7 else 544
    off = 8 if qt == 2 else 16 if qt == 6 else 128 if qt == 8 else 0
    for g in prange((N + 15) // 16):
        tid = numba.get_thread_id()
        acc = accs[tid]
        isum = isums[tid]
        acc[: 16 * T] = 0
        for b in range(nb):
            o = (g * nb + b) * rec
            for t in range(T):
                xo = t * xk + 32 * b
                if qt == 8:
                    _dot8(w, o + 32, o, xq, xo, isum, 0, 0)
                elif qt == 2:
                    _dot4(w, o + 32, o, xq, xo, isum, 0, 0)
                elif qt == 3:
                    _dot4(w, o + 64, o, xq, xo, isum, 0, 0)
                elif qt == 6:
                    _dot5(w, o + 96, o + 32, xq, xo, isum, 0, 0)
                else:
                    _dot5(w, o + 128, o + 64, xq, xo, isum, 0, 0)
                _acc_f16(acc, 16 * t, w, o, isum, 0, xd[t, b], off * xsum[t, b])
                if qt == 3 or qt == 7:
                    _acc_f16s(acc, 16 * t, w, o + 32, xs[t, b])
        _store_out(out, acc, g, N, T)


@njit(parallel=True, cache=True)
def _mm_k(out, w, N, K, T, qt, xq, xk, xd, bsums, accs, isums):
    """Q4_K/Q5_K/Q6_K super-blocks against Q8_K activations (bsums: sums of 16)."""
    nb = K // QK_K
    rec = 2368 if qt == 12 else 2880 if qt == 13 else 3360
    for g in prange((N + 15) // 16):
        tid = numba.get_thread_id()
        acc = accs[tid]
        isum = isums[tid]
        acc[: 16 * T] = 0
        for b in range(nb):
            o = (g * nb + b) * rec
            for t in range(T):
                xo = t * xk + QK_K * b
                isum[:32] = 0
                if qt == 14:
                    for j in range(8):
                        xj = xo + 32 * j
                        _dot6_i8(w, o + 1312 + 256 * j, o + 288 + 128 * j, xq, xj, isum, 0, o + 32 + 32 * j)
                    for j in range(16):  # the -32 of every value, exactly: -32 * scale * sum(x)
                        _acc_i8(isum, 0, w, o + 32 + 16 * j, -32 * bsums[t, 16 * b + j])
                    _acc_f16(acc, 16 * t, w, o, isum, 0, xd[t, b], 0)
                else:
                    for j in range(8):
                        xj = xo + 32 * j
                        if qt == 12:
                            _dot4_u8(w, o + 320 + 256 * j, o, xq, xj, isum, 0, o + 64 + 16 * j)
                        else:
                            _dot5_u8(w, o + 832 + 256 * j, o + 320 + 64 * j, xq, xj, isum, 0, o + 64 + 16 * j)
                        bs = bsums[t, 16 * b + 2 * j] + bsums[t, 16 * b + 2 * j + 1]
                        _acc_u8(isum, 16, w, o + 192 + 16 * j, bs)
                    _acc_f16(acc, 16 * t, w, o, isum, 0, xd[t, b], 0)
                    _acc_f16(acc, 16 * t, w, o + 32, isum, 16, -xd[t, b], 0)
        _store_out(out, acc, g, N, T)


@njit(cache=True)
def _block_sums(xq, T, K, xsum):
    """Integer sums of each 32-block of the quantized activations (for the stored-unsigned offsets)."""
    for t in range(T):
        for b in range(K // 32):
            s = 0
            for j in range(32):
                s += np.int32(xq[t, 32 * b + j])
            xsum[t, b] = s
