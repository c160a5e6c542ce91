"""GGML block formats: a numpy reference for every block type edgert reads.

Each format is a small class registered by `__init_subclass__(qtype=...)`, as in gguf-py `quants.py`:
`dequantize_blocks(uint8[n, type_size]) -> float32[n, block_size]` and, where edgert writes the format,
`quantize_blocks(float32[n, block_size]) -> uint8[n, type_size]` following ggml's `quantize_row_*_ref`.
Dequantization repeats ggml's float operations in ggml's order, so it equals gguf-py bit for bit.
This module is the reference the fused numba kernels in `kernels.py` are tested against.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import numpy as np

from edgert.errors import FormatError, UnsupportedError

QK_K = 256  # elements per K-quant super-block


class QType(enum.IntEnum):
    """GGML tensor types (ids as in ggml.h / GGUF)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    BF16 = 30


# (elements per block, bytes per block); sizes are those of ggml's block structs.
# Q8_1 is `{half d; half s; int8 qs[32]}` = 36 bytes in ggml (gguf-py still lists the old 40).
_SIZES: dict[QType, tuple[int, int]] = {
    QType.F32: (1, 4),
    QType.F16: (1, 2),
    QType.BF16: (1, 2),
    QType.Q4_0: (32, 2 + 16),
    QType.Q4_1: (32, 2 + 2 + 16),
    QType.Q5_0: (32, 2 + 4 + 16),
    QType.Q5_1: (32, 2 + 2 + 4 + 16),
    QType.Q8_0: (32, 2 + 32),
    QType.Q8_1: (32, 2 + 2 + 32),
    QType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    QType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    QType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    QType.Q8_K: (QK_K, 4 + QK_K + 2 * (QK_K // 16)),
}
BLOCK_SIZE: dict[QType, int] = {q: s[0] for q, s in _SIZES.items()}
TYPE_SIZE: dict[QType, int] = {q: s[1] for q, s in _SIZES.items()}

_FORMATS: dict[QType, type[BlockFormat]] = {}


def as_qtype(qtype: int) -> QType:
    """`qtype` as a QType, or UnsupportedError naming the types edgert reads."""
    try:
        q = QType(int(qtype))
    except ValueError:
        q = None
    if q is None or q not in _FORMATS:
        supported = ", ".join(t.name for t in _FORMATS)
        raise UnsupportedError(f"GGML block type {qtype} is not supported; supported: {supported}")
    return q


def row_nbytes(qtype: int, n_elems: int) -> int:
    """Bytes taken by `n_elems` values of `qtype`; n_elems must be whole blocks."""
    q = as_qtype(qtype)
    bs = BLOCK_SIZE[q]
    if n_elems % bs:
        raise FormatError(
            f"{q.name} rows are stored in blocks of {bs} values, but a row has {n_elems}; "
            "the file is corrupt or the tensor shape is wrong"
        )
    return n_elems // bs * TYPE_SIZE[q]


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode GGUF tensor bytes `raw` (uint8, last dim whole rows) into float32 of `shape`."""
    fmt = _FORMATS[as_qtype(qtype)]
    n = int(np.prod(shape, dtype=np.int64))
    nbytes = row_nbytes(fmt.qtype, n)
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if flat.size != nbytes:
        raise FormatError(
            f"{fmt.qtype.name} tensor of shape {tuple(shape)} needs {nbytes} bytes, got {flat.size}"
        )
    blocks = flat.reshape(-1, fmt.type_size)
    return fmt.dequantize_blocks(blocks).reshape(shape)


def quantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """Encode float32 `data` as GGUF bytes: uint8 with the last dim replaced by bytes per row."""
    fmt = _FORMATS[as_qtype(qtype)]
    data = np.ascontiguousarray(data, dtype=np.float32)
    nbytes = row_nbytes(fmt.qtype, data.shape[-1])
    out = fmt.quantize_blocks(data.reshape(-1, fmt.block_size))
    return out.reshape(*data.shape[:-1], nbytes)


class BlockFormat:
    """One GGML block type: `block_size` values stored in `type_size` bytes."""

    qtype: ClassVar[QType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]

    def __init_subclass__(cls, qtype: QType, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.qtype = qtype
        cls.block_size, cls.type_size = _SIZES[qtype]
        assert qtype not in _FORMATS, qtype
        _FORMATS[qtype] = cls

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        raise UnsupportedError(f"edgert reads {cls.qtype.name} but cannot write it; quantize to Q4_0 or Q8_0")


# ---------------------------------------------------------------- helpers


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes [..., 2] -> float32 [..., 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _to_f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 [n, 1] -> fp16 bytes [n, 2] (round to nearest even, as ggml's FP32_TO_FP16)."""
    return x.astype(np.float16).view(np.uint8)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Packed 4-bit quants [n, 16] -> [n, 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] values in 0..15 -> [n, 16] bytes (inverse of `_nibbles`)."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5 high bits: uint32 little-endian [n, 4] bytes -> [n, 32] of 0/1 (bit j is element j)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _round_away(x: np.ndarray) -> np.ndarray:
    """C `roundf`: halves round away from zero (exact: a - floor(a) is exact in float32)."""
    a = np.abs(x)
    f = np.floor(a)
    return np.copysign(np.where(a - f >= 0.5, f + 1, f), x)


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """The value with the largest magnitude in each block (first one on ties), as ggml's loops pick it."""
    i = np.abs(blocks).argmax(axis=-1)[:, None]
    return np.take_along_axis(blocks, i, axis=-1)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12 packed bytes -> eight 6-bit scales and eight 6-bit mins (ggml get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


# ---------------------------------------------------------------- float types


class F32(BlockFormat, qtype=QType.F32):
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float32).copy()

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint8)


class F16(BlockFormat, qtype=QType.F16):
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _f16(blocks)

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _to_f16_bytes(blocks.astype(np.float32))


class BF16(BlockFormat, qtype=QType.BF16):
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        h = np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32)
        return (h << 16).view(np.float32)

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # ggml_compute_fp32_to_bf16: NaNs become quiet NaNs, everything else rounds to nearest even.
        u = np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint32).astype(np.uint64)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        h = np.where(nan, (u >> 16) | 64, rounded)
        return h.astype(np.uint16).view(np.uint8)


# ---------------------------------------------------------------- 32-element blocks


class Q4_0(BlockFormat, qtype=QType.Q4_0):
    # block_q4_0: half d; uint8 qs[16]          x = d * (q - 8)
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _f16(blocks[:, :2])
        q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
        return d * q.astype(np.float32)

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _signed_absmax(blocks) / np.float32(-8)
        q = np.trunc(blocks * _inverse(d) + np.float32(8.5)).clip(0, 15).astype(np.uint8)
        return np.concatenate([_to_f16_bytes(d), _pack_nibbles(q)], axis=-1)


class Q4_1(BlockFormat, qtype=QType.Q4_1):
    # block_q4_1: half d; half m; uint8 qs[16]  x = d * q + m
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        q = _nibbles(blocks[:, 4:]).astype(np.float32)
        return d * q + m

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        lo = blocks.min(axis=-1, keepdims=True)
        d = (blocks.max(axis=-1, keepdims=True) - lo) / np.float32(15)
        q = np.trunc((blocks - lo) * _inverse(d) + np.float32(0.5)).clip(0, 15).astype(np.uint8)
        return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(lo), _pack_nibbles(q)], axis=-1)


class Q5_0(BlockFormat, qtype=QType.Q5_0):
    # block_q5_0: half d; uint8 qh[4]; uint8 qs[16]   x = d * ((q | h << 4) - 16)
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _f16(blocks[:, :2])
        q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
        return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _signed_absmax(blocks) / np.float32(-16)
        q = np.trunc(blocks * _inverse(d) + np.float32(16.5)).clip(0, 31).astype(np.uint8)
        qh = np.packbits(q >> 4, axis=-1, bitorder="little")
        return np.concatenate([_to_f16_bytes(d), qh, _pack_nibbles(q & 0x0F)], axis=-1)


class Q5_1(BlockFormat, qtype=QType.Q5_1):
    # block_q5_1: half d; half m; uint8 qh[4]; uint8 qs[16]   x = d * (q | h << 4) + m
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
        return d * q.astype(np.float32) + m

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        lo = blocks.min(axis=-1, keepdims=True)
        d = (blocks.max(axis=-1, keepdims=True) - lo) / np.float32(31)
        q = np.trunc((blocks - lo) * _inverse(d) + np.float32(0.5)).clip(0, 31).astype(np.uint8)
        qh = np.packbits(q >> 4, axis=-1, bitorder="little")
        return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(lo), qh, _pack_nibbles(q & 0x0F)], axis=-1)


class Q8_0(BlockFormat, qtype=QType.Q8_0):
    # block_q8_0: half d; int8 qs[32]           x = q * d
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _f16(blocks[:, :2])
        q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)
        return q * d

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        q = _round_away(blocks * _inverse(d)).astype(np.int8).view(np.uint8)
        return np.concatenate([_to_f16_bytes(d), q], axis=-1)


class Q8_1(BlockFormat, qtype=QType.Q8_1):
    # block_q8_1: half d; half s = d * sum(q); int8 qs[32]   x = q * d
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _f16(blocks[:, :2])
        q = np.ascontiguousarray(blocks[:, 4:]).view(np.int8).astype(np.float32)
        return q * d

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        q = _round_away(blocks * _inverse(d)).astype(np.int8)
        s = q.astype(np.int32).sum(axis=-1, keepdims=True).astype(np.float32) * d
        return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(s), q.view(np.uint8)], axis=-1)


# ---------------------------------------------------------------- 256-element K-quants


class Q4_K(BlockFormat, qtype=QType.Q4_K):
    # half d; half dmin; uint8 scales[12] (8 x 6-bit scale, 8 x 6-bit min); uint8 qs[128]
    # 8 sub-blocks of 32: x = (d * sc) * q - (dmin * m); each 32 bytes of qs hold 64 values
    # (low nibbles, then high nibbles)
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = k_scale_min(blocks[:, 4:16])
        ds = (d * sc.astype(np.float32))[:, :, None]
        dm = (dmin * mn.astype(np.float32))[:, :, None]
        qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, 8, 32).astype(np.float32)
        return (ds * q - dm).reshape(n, QK_K)


class Q5_K(BlockFormat, qtype=QType.Q5_K):
    # half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]; as Q4_K with a fifth bit from qh
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = k_scale_min(blocks[:, 4:16])
        ds = (d * sc.astype(np.float32))[:, :, None]
        dm = (dmin * mn.astype(np.float32))[:, :, None]
        qs = blocks[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        ql = (qs & 0x0F).reshape(n, 8, 32)
        # sub-block j takes bit j of each qh byte
        qh = (blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = (ql | (qh << 4)).astype(np.float32)
        return (ds * q - dm).reshape(n, QK_K)


class Q6_K(BlockFormat, qtype=QType.Q6_K):
    # uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d        x = (d * sc) * (q - 32), 16 per scale
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210])
        ds = (d * sc)[:, :, None]
        # per 128-value half: low nibbles of ql[0:32], ql[32:64], high nibbles of the same;
        # the two high bits come from qh[0:32] at shifts 0, 2, 4, 6.
        lo = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        lo = (lo & 0x0F).reshape(n, 2, 4, 32)
        hi = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        hi = hi & 3
        q = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
        return (ds * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


class Q8_K(BlockFormat, qtype=QType.Q8_K):
    # float d; int8 qs[256]; int16 bsums[16] (sum of each 16 quants)    x = d * q
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = np.ascontiguousarray(blocks[:, :4]).view(np.float32)
        return d * np.ascontiguousarray(blocks[:, 4:260]).view(np.int8).astype(np.float32)

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # quantize_row_q8_K_ref: scale by -127/max (max = signed value of largest magnitude), round half even
        n = blocks.shape[0]
        mx = _signed_absmax(blocks)
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(mx == 0, np.float32(0), np.float32(-127) / mx).astype(np.float32)
            d = np.where(mx == 0, np.float32(0), np.float32(1) / iscale).astype(np.float32)
        q = np.minimum(np.rint(iscale * blocks), 127).astype(np.int8)
        bsums = q.reshape(n, 16, 16).astype(np.int16).sum(axis=-1, dtype=np.int16)
        return np.concatenate([d.view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=-1)
