"""Block formats against gguf-py, and the numba kernels against the numpy reference."""

import gguf
import numpy as np
import pytest
from edgert.quant import formats as F
from edgert.quant import kernels as K
from edgert.quant.formats import BLOCK_SIZE, TYPE_SIZE, QType
from edgert.quant.pack import resident_nbytes, unpack
from gguf import quants as gq

from edgert.errors import FormatError, UnsupportedError

ALL = list(QType)
GGUF_DEQUANT = [q for q in ALL if q not in (QType.Q8_1, QType.Q8_K)]  # gguf-py lacks these two
WRITABLE = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]
MATMUL = [q for q in ALL if q not in (QType.Q8_1, QType.Q8_K)]

# byte offsets of the fp16 scale fields, overwritten with finite values in random blocks
_F16_FIELDS = {
    QType.Q4_0: (0,),
    QType.Q4_1: (0, 2),
    QType.Q5_0: (0,),
    QType.Q5_1: (0, 2),
    QType.Q8_0: (0,),
    QType.Q8_1: (0, 2),
    QType.Q4_K: (0, 2),
    QType.Q5_K: (0, 2),
    QType.Q6_K: (208,),
}


def random_rows(q: QType, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, row bytes] of random valid blocks: random quant bits, sane finite scales."""
    nb = n * k // BLOCK_SIZE[q]
    if q in (QType.F32, QType.F16, QType.BF16):
        return F.quantize(rng.standard_normal((n, k)).astype(np.float32), q)
    b = rng.integers(0, 256, (nb, TYPE_SIZE[q]), dtype=np.uint8)
    for o in _F16_FIELDS.get(q, ()):
        b[:, o : o + 2] = rng.uniform(-0.05, 0.05, (nb, 1)).astype(np.float16).view(np.uint8)
    if q == QType.Q8_K:
        b[:, :4] = rng.uniform(-0.05, 0.05, (nb, 1)).astype(np.float32).view(np.uint8)
    return b.reshape(n, -1)


def gguf_type(q: QType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType(int(q))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------- formats vs gguf-py


@pytest.mark.parametrize("q", GGUF_DEQUANT, ids=lambda q: q.name)
def test_dequantize_matches_gguf(q):
    rng = np.random.default_rng(int(q))
    raw = random_rows(q, 6, 512, rng)
    ref = gq.dequantize(raw, gguf_type(q)).astype(np.float32)
    assert same_bits(F.dequantize(raw, q, (6, 512)), ref)
    if q in WRITABLE and q not in (QType.F32, QType.F16, QType.BF16):
        # blocks written by gguf-py's quantizer (includes all-zero blocks)
        x = rng.standard_normal((4, 256)).astype(np.float32)
        x[0, :32] = 0
        raw = gq.quantize(x, gguf_type(q))
        assert same_bits(F.dequantize(raw, q, x.shape), gq.dequantize(raw, gguf_type(q)))


@pytest.mark.parametrize("q", WRITABLE, ids=lambda q: q.name)
def test_quantize_matches_gguf(q):
    rng = np.random.default_rng(100 + int(q))
    x = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 10, (8, 1))).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = 1.0  # ties and constant blocks
    mine = F.quantize(x, q)
    assert mine.dtype == np.uint8 and mine.shape == (8, F.row_nbytes(q, 256))
    assert np.array_equal(mine, gq.quantize(x, gguf_type(q)).view(np.uint8).reshape(mine.shape))


def test_q8_1_and_q8_k_round_trip():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    for q, rtol in ((QType.Q8_1, 1 / 127), (QType.Q8_K, 1 / 127)):
        back = F.dequantize(F.quantize(x, q), q, x.shape)
        amax = np.abs(x.reshape(-1, BLOCK_SIZE[q])).max(axis=1).repeat(BLOCK_SIZE[q]).reshape(x.shape)
        assert np.all(np.abs(back - x) <= amax * rtol)
    raw = F.quantize(x, QType.Q8_K).reshape(-1, TYPE_SIZE[QType.Q8_K])
    qs = raw[:, 4:260].view(np.int8).astype(np.int16).reshape(-1, 16, 16).sum(-1)
    assert np.array_equal(raw[:, 260:].copy().view(np.int16), qs)


def test_sizes_and_errors():
    assert F.row_nbytes(QType.Q4_K, 512) == 288 and F.row_nbytes(QType.Q8_0, 64) == 68
    assert TYPE_SIZE[QType.Q8_1] == 36  # ggml's block_q8_1 {half d, half s, int8 qs[32]}
    with pytest.raises(FormatError):
        F.row_nbytes(QType.Q4_0, 33)
    with pytest.raises(UnsupportedError, match="block type 10 is not supported; supported: F32"):
        F.dequantize(np.zeros(84, np.uint8), 10, (256,))  # Q2_K
    with pytest.raises(UnsupportedError):
        F.quantize(np.zeros(256, np.float32), QType.Q4_K)
    with pytest.raises(UnsupportedError):
        K.matmul(np.zeros((1, 1), np.float32), np.zeros((1, 32), np.float32), np.zeros((1, 36), np.uint8), 9,
                 K.MatmulScratch(1, 32))  # fmt: skip


# ---------------------------------------------------------------- numba twins


@pytest.mark.parametrize("q", ALL, ids=lambda q: q.name)
def test_dequantize_rows_and_get_rows(q):
    rng = np.random.default_rng(200 + int(q))
    big = random_rows(q, 9, 768, rng)
    w = big[:, : F.row_nbytes(q, 512)]  # column slice: strided rows
    ref = F.dequantize(np.ascontiguousarray(w), q, (9, 512))
    out = np.empty((9, 512), np.float32)
    K.dequantize_rows(out, w, q)
    assert same_bits(out, ref)
    for ids in (np.array([3, 0, 8, 3], np.int32), np.array([7], np.int64)):
        emb = np.empty((len(ids), 512), np.float32)
        K.get_rows(emb, w, q, ids)
        assert same_bits(emb, ref[ids])


def test_round_f16_matches_numpy():
    rng = np.random.default_rng(7)
    x = np.concatenate(
        [
            rng.standard_normal(4000) * 10.0 ** rng.uniform(-9, 5, 4000),
            [0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14],
        ]
    ).astype(np.float32)
    x = np.concatenate([x, np.float16(rng.standard_normal(100)).astype(np.float32) * 1.0001])
    got = np.empty_like(x)
    K._round_f16_array(x, got)
    with np.errstate(over="ignore"):  # 1e9 -> inf on purpose
        ref = x.astype(np.float16).astype(np.float32)
    assert same_bits(got, ref)


# ---------------------------------------------------------------- matmul


def act_q8_0(x):
    """numpy twin of ggml's x86 quantize_row_q8_0/q8_1: (q, d as f32 of fp16, s as f32 of fp16)."""
    b = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        idl = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(b * idl), -128, 127)
    s = (d[..., 0] * q.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float32)
    return q, d[..., 0].astype(np.float16).astype(np.float32), s


def act_q8_k(x):
    """numpy twin of ggml quantize_row_q8_K."""
    b = x.reshape(x.shape[0], -1, 256)
    i = np.abs(b).argmax(-1)[..., None]
    mx = np.take_along_axis(b, i, -1)
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    return np.minimum(np.rint(iscale * b), 127), d[..., 0]


def matmul_reference(x, w, q):
    """The kernel's semantics in float64: quantized activations times exactly dequantized weights."""
    W = F.dequantize(np.ascontiguousarray(w), q, (w.shape[0], x.shape[1])).astype(np.float64)
    if q in (QType.F32, QType.F16, QType.BF16):
        return x.astype(np.float64) @ W.T
    if q in (QType.Q4_K, QType.Q5_K, QType.Q6_K):
        xq, xd = act_q8_k(x)
        X = (xq * xd[..., None]).reshape(x.shape)
        return X @ W.T
    xq, xd, xs = act_q8_0(x)
    X = (xq * xd[..., None]).reshape(x.shape)
    out = X @ W.T
    if q in (QType.Q4_1, QType.Q5_1):
        # the min term uses s = fp16(d * sum q), as ggml's Q8_1 blocks do
        m = w.reshape(w.shape[0], -1, TYPE_SIZE[q])[:, :, 2:4].copy().view(np.float16)[..., 0]
        m = m.astype(np.float64)
        exact = xd[..., None] * xq.sum(-1)[..., None]  # [T, nb, 1]
        out += (xs - exact[..., 0]) @ m.T
    return out


@pytest.mark.parametrize("q", MATMUL, ids=lambda q: q.name)
def test_matmul(q):
    rng = np.random.default_rng(300 + int(q))
    N, Kd = 24, 512
    scratch = K.MatmulScratch(8, 1024)
    big = random_rows(q, N, 2 * Kd, rng)
    for T in (1, 7):
        x = rng.standard_normal((T, Kd)).astype(np.float32)
        x[0, :256] = 0  # all-zero activation blocks
        for w in (big[:, : F.row_nbytes(q, Kd)], np.ascontiguousarray(big[:, F.row_nbytes(q, Kd) :])):
            buf = np.full((T + 2, N), np.nan, np.float32)
            out = buf[1 : T + 1]  # a row slice of a bigger buffer
            K.matmul(out, x, w, q, scratch)
            assert np.isnan(buf[0]).all() and np.isnan(buf[-1]).all()
            ref = matmul_reference(x, w, q)
            W = F.dequantize(np.ascontiguousarray(w), q, (N, Kd))
            scale = np.abs(x) @ np.abs(W).T  # magnitude of the sum, for a relative tolerance
            np.testing.assert_array_less(np.abs(out - ref), 1e-5 * scale + 1e-30)
            # against plain f32: each activation is off by at most half a step (amax/254) plus the fp16
            # rounding of the block scale (amax * 2^-11); weights are exact in both.
            bs = 256 if q in (QType.Q4_K, QType.Q5_K, QType.Q6_K) else 32
            amax = np.abs(x.reshape(T, -1, bs)).max(-1).repeat(bs, axis=-1)
            if q in (QType.F32, QType.F16, QType.BF16):
                amax = 0 * amax
            bound = (amax * (1 / 254 + 2.0**-11)) @ np.abs(W).T + 1e-5 * scale
            np.testing.assert_array_less(np.abs(out - x @ W.T), bound + 1e-30)


@pytest.mark.parametrize("q", MATMUL, ids=lambda q: q.name)
def test_packed_matmul(q):
    """`pack`ed weights: the same bits as the raw rows (a streamed unit runs the raw kernels on
    its slot, a pinned one the packed kernels: they must agree), N not a multiple of the 16-row
    group, a strided source, and prefill rows bit-equal to one-row decode calls."""
    rng = np.random.default_rng(400 + int(q))
    N, Kd = 37, 512
    scratch = K.MatmulScratch(8, 1024)
    big = random_rows(q, N, 2 * Kd, rng)
    w = big[:, : F.row_nbytes(q, Kd)]  # strided rows
    P = K.pack(w, q)
    assert (P.qtype, P.n_rows, P.n_cols, P.shape) == (q, N, Kd, w.shape)
    group_bytes = 48 * F.row_nbytes(q, Kd)  # 37 rows padded to 3 groups of 16
    assert P.nbytes == (group_bytes if P.interleaved else w.nbytes)  # records are the blocks' size
    W = F.dequantize(np.ascontiguousarray(w), q, (N, Kd))
    x = rng.standard_normal((7, Kd)).astype(np.float32)
    x[0, :256] = 0
    ref = matmul_reference(x, w, q)
    scale = np.abs(x) @ np.abs(W).T
    outs = []
    for wt in (P, w):
        out = np.full((7, N), np.nan, np.float32)
        K.matmul(out, x, wt, q, scratch)
        np.testing.assert_array_less(np.abs(out - ref), 1e-5 * scale + 1e-30)
        for t in range(7):  # decode == prefill, bit for bit
            one = np.empty((1, N), np.float32)
            K.matmul(one, x[t : t + 1], wt, q, scratch)
            assert same_bits(one, out[t : t + 1])
        outs.append(out)
    assert same_bits(outs[0], outs[1])


def hsum8_ref(acc):
    """ggml's hsum_float_8 over the last axis (8): ((0+4) + (2+6)) + ((1+5) + (3+7))."""
    r = (acc[..., :4] + acc[..., 4:]).astype(np.float32)
    return ((r[..., 0] + r[..., 2]) + (r[..., 1] + r[..., 3])).astype(np.float32)


def ggml_q32_matmul(x, w, q):
    """numpy transcription of ggml's x86 `ggml_vec_dot_q4_0_q8_0` / `_q4_1_q8_1` / ... (and tinyBLAS's
    per-output order for a batch): 8 lanes of 4 values each, one FMA chain per lane over the blocks,
    hsum_float_8, plus the Q4_1/Q5_1 min chain m_w * s_x."""
    from edgert.kernels import fma32_ref

    N, nb = w.shape[0], x.shape[1] // 32
    W = F.dequantize(np.ascontiguousarray(w), q, (N, x.shape[1])).reshape(N, nb, 32)
    blocks = w.reshape(N, nb, TYPE_SIZE[q])
    dw = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    has_min = q in (QType.Q4_1, QType.Q5_1)
    mw = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if has_min else None
    safe = np.where(dw == 0, 1, dw)[..., None]
    ints = np.rint((W - mw[..., None]) / safe if has_min else W / safe)  # the signed quant values
    xq, xd, xs = act_q8_0(x)  # [T, nb, 32], [T, nb], [T, nb]
    lanes = (ints[None] * xq[:, None]).reshape(x.shape[0], N, nb, 8, 4).sum(-1).astype(np.float32)
    d = (dw[None] * xd[:, None]).astype(np.float32)  # [T, N, nb]
    acc = np.zeros((x.shape[0], N, 8), np.float32)
    sm = np.zeros((x.shape[0], N), np.float32)
    for b in range(nb):
        acc = fma32_ref(d[:, :, b, None], lanes[:, :, b], acc)
        if has_min:
            sm = fma32_ref(mw[None, :, b], xs[:, None, b], sm)
    return (hsum8_ref(acc) + sm).astype(np.float32)


def _k_fields(w, q):
    """Integer fields of Q4_K / Q6_K rows: d, dmin (Q4_K), per-value scale, signed value."""
    N = w.shape[0]
    blk = w.reshape(N, -1, TYPE_SIZE[q]).astype(np.int64)
    f16 = lambda o: w.reshape(N, -1, TYPE_SIZE[q])[..., o : o + 2].copy().view(np.float16)[..., 0]  # noqa: E731
    if q == QType.Q6_K:
        ql, qh, sc = blk[..., :128], blk[..., 128:192], blk[..., 192:208].astype(np.int8).astype(np.int64)
        vals = []
        for hh in range(2):
            a, c, h = (
                ql[..., 64 * hh : 64 * hh + 32],
                ql[..., 64 * hh + 32 : 64 * hh + 64],
                qh[..., 32 * hh : 32 * hh + 32],
            )
            vals += [(a & 15) | ((h & 3) << 4), (c & 15) | (((h >> 2) & 3) << 4)]
            vals += [(a >> 4) | (((h >> 4) & 3) << 4), (c >> 4) | (((h >> 6) & 3) << 4)]
        return f16(208).astype(np.float32), None, sc, np.concatenate(vals, -1) - 32
    s = blk[..., 4:16]
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    qs = blk[..., 16:144].reshape(N, -1, 4, 32)
    vals = np.concatenate(
        [np.concatenate([qs[..., c, :] & 15, qs[..., c, :] >> 4], -1) for c in range(4)], -1
    )
    return f16(0).astype(np.float32), (f16(2).astype(np.float32), mn), sc, vals


def ggml_k_matmul(x, w, q, batch):
    """numpy transcription of ggml's x86 Q4_K / Q6_K orders: its tiled kernel for a batch of 8 tokens
    or more, `ggml_vec_dot_q4_K_q8_K` / `_q6_K_q8_K` (8 integer lanes, 4 min lanes) below."""
    from edgert.kernels import fma32_ref

    T, N = x.shape[0], w.shape[0]
    xq, xd = act_q8_k(x)  # [T, nb, 256], [T, nb]
    xq = xq.astype(np.int64)
    dw, mins, sc, vals = _k_fields(w, q)
    per = np.repeat(sc, 256 // sc.shape[-1], -1)  # each value's scale
    prod = (vals * per)[None] * xq[:, None]  # [T, N, nb, 256]
    s32 = xq.reshape(T, -1, 8, 32).sum(-1)  # activation sums of 32
    acc = np.zeros((T, N, 8), np.float32) if batch < 8 else np.zeros((T, N), np.float32)
    accm = np.zeros((T, N, 4), np.float32)
    for b in range(xq.shape[1]):
        if batch >= 8:
            r = (prod[:, :, b].sum(-1).astype(np.float32) * dw[None, :, b]).astype(np.float32)
            if mins is not None:
                imin = (mins[1][None, :, b] * s32[:, None, b]).sum(-1).astype(np.float32)
                r = fma32_ref(-mins[0][None, :, b], imin, r)
            acc = fma32_ref(r, xd[:, None, b], acc)
            continue
        lanes = prod[:, :, b].reshape(T, N, 8, 8, 4).sum(-1).sum(-2)  # lane m: values 4m..4m+3 of each 32
        if q == QType.Q6_K:  # ggml moves the -32 between lanes: lane m takes sub-block m's
            scaled = (per[None, :, b] * xq[:, None, b]).reshape(T, N, 8, 8, 4).sum(-1).sum(-2)
            s16 = xq[:, b].reshape(T, 16, 16).sum(-1)
            by_sub = (sc[None, :, b] * s16[:, None]).reshape(T, N, 8, 2).sum(-1)
            lanes = lanes + 32 * scaled - 32 * by_sub
        d = (xd[:, None, b] * dw[None, :, b]).astype(np.float32)
        acc = fma32_ref(d[..., None], lanes.astype(np.float32), acc)
        if mins is not None:
            pm = (mins[1][None, :, b] * s32[:, None, b]).reshape(T, N, 4, 2).sum(-1)
            dm = (-xd[:, None, b] * mins[0][None, :, b]).astype(np.float32)
            accm = fma32_ref(dm[..., None], pm.astype(np.float32), accm)
    if batch >= 8:
        return acc
    m = ((accm[..., 0] + accm[..., 2]) + (accm[..., 1] + accm[..., 3])).astype(np.float32)
    return (hsum8_ref(acc) + m).astype(np.float32)


@pytest.mark.parametrize("q", [QType.Q4_K, QType.Q6_K], ids=str)
def test_k_matmul_in_ggml_order(q):
    """With llama.cpp parity, packed Q4_K / Q6_K sum in the order llama.cpp picks by batch size."""
    rng = np.random.default_rng(800 + int(q))
    N, Kd = 37, 512
    w = random_rows(q, N, Kd, rng)
    P = K.pack(w, q)
    for T, batch in ((9, 9), (5, 5), (3, 3), (1, 1), (1, 40)):  # (1, 40): one row of a batch of 40
        x = rng.standard_normal((T, Kd)).astype(np.float32)
        scratch = K.MatmulScratch(T, Kd)
        scratch.ggml_order, scratch.ggml_batch = True, batch
        out = np.empty((T, N), np.float32)
        K.matmul(out, x, P, q, scratch)
        np.testing.assert_array_equal(out, ggml_k_matmul(x, w, q, batch), err_msg=f"T={T} batch={batch}")


@pytest.mark.parametrize("q", [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0], ids=str)
def test_q32_matmul_in_ggml_order(q):
    """With llama.cpp parity on, packed and raw kernels both sum blocks of 32 exactly as ggml does
    (so edgert's activations equal llama.cpp's bit for bit), for a batch and for one token."""
    rng = np.random.default_rng(700 + int(q))
    N, Kd, T = 37, 512, 11  # a register tile of 8 tokens, then 3 alone
    w = random_rows(q, N, Kd, rng)
    x = rng.standard_normal((T, Kd)).astype(np.float32)
    want = ggml_q32_matmul(x, w, q)
    scratch = K.MatmulScratch(T, Kd)
    scratch.ggml_order = True  # llama.cpp parity
    for wt in (K.pack(w, q), w):
        out = np.empty((T, N), np.float32)
        K.matmul(out, x, wt, q, scratch)
        np.testing.assert_array_equal(out, want)
        for t in range(T):  # one token at a time: the same bits
            one = np.empty((1, N), np.float32)
            K.matmul(one, x[t : t + 1], wt, q, scratch)
            np.testing.assert_array_equal(one, want[t : t + 1])
    scratch.ggml_order = False  # the fast order: within float reassociation of it
    K.matmul(out, x, K.pack(w, q), q, scratch)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q", ALL, ids=lambda q: q.name)
def test_pack_round_trip_and_get_rows(q):
    """unpack(pack(w)) gives back every byte (random bits everywhere), and get_rows reads packed rows."""
    rng = np.random.default_rng(500 + int(q))
    w = rng.integers(0, 256, (37, F.row_nbytes(q, 512)), dtype=np.uint8)
    P = K.pack(w, q)
    assert np.array_equal(unpack(P), w)
    assert P.data.nbytes == resident_nbytes(q, 37, w.shape[1])  # what the memory plan counts
    w = random_rows(q, 37, 512, rng)
    P = K.pack(w, q)
    ids = np.array([36, 0, 17, 16, 36], np.int64)
    got, ref = np.empty((5, 512), np.float32), np.empty((5, 512), np.float32)
    K.get_rows(got, P, q, ids)
    K.get_rows(ref, w, q, ids)
    assert same_bits(got, ref)


def test_pack_errors():
    w = random_rows(QType.Q4_K, 16, 256, np.random.default_rng(0))
    P = K.pack(w, QType.Q4_K)
    x = np.zeros((1, 512), np.float32)  # wrong K for this weight
    with pytest.raises(ValueError):
        K.matmul(np.zeros((1, 16), np.float32), x, P, QType.Q4_K, K.MatmulScratch(1, 512))
    with pytest.raises(ValueError):
        K.pack(w.view(np.int8), QType.Q4_K)


@pytest.mark.parametrize(
    "q", [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q8_0, QType.Q4_K, QType.Q6_K], ids=str
)
def test_packed_matmul_tiles(q):
    """Prompt chunks run in register tiles of pack.NT tokens within chunks of pack.TC: every token of a
    long chunk (tiles, remainders, a second chunk) is bit-equal to its own one-token call."""
    rng = np.random.default_rng(600 + int(q))
    N, Kd, T = 20, 512, 70
    assert T > K._pk.TC and T % K._pk.NT and T % K._pk.NT32
    w = random_rows(q, N, Kd, rng)
    P = K.pack(w, q)
    x = rng.standard_normal((T, Kd)).astype(np.float32)
    scratch = K.MatmulScratch(T, Kd)
    out = np.empty((T, N), np.float32)
    K.matmul(out, x, P, q, scratch)
    W = F.dequantize(w, q, (N, Kd))
    np.testing.assert_array_less(
        np.abs(out - matmul_reference(x, w, q)), 1e-5 * np.abs(x) @ np.abs(W).T + 1e-30
    )
    one = np.empty((1, N), np.float32)
    for t in range(T):
        K.matmul(one, x[t : t + 1], P, q, scratch)
        assert same_bits(one, out[t : t + 1]), t


def test_matmul_same_input_reuses_quantization():
    """same_input=True skips quantizing x when the scratch holds it for the same activation type, and
    quantizes anyway when the type differs (Q8_0 -> Q8_1 -> Q8_K), so results equal fresh calls."""
    rng = np.random.default_rng(7)
    Kd, T = 512, 5
    x, y = rng.standard_normal((2, T, Kd)).astype(np.float32)
    ws = {
        q: K.pack(random_rows(q, 24, Kd, rng), q)
        for q in (QType.Q5_0, QType.Q8_0, QType.Q4_1, QType.Q4_K, QType.Q6_K)
    }
    fresh = {}
    for q, w in ws.items():
        fresh[q] = np.empty((T, 24), np.float32)
        K.matmul(fresh[q], x, w, q, K.MatmulScratch(T, Kd))
    scratch = K.MatmulScratch(T, Kd)
    for i, (q, w) in enumerate(ws.items()):
        out = np.empty((T, 24), np.float32)
        K.matmul(out, x, w, q, scratch, same_input=i > 0)
        assert same_bits(out, fresh[q]), q
    # the reuse is real: y is ignored when the scratch already holds x for this type
    out = np.empty((T, 24), np.float32)
    K.matmul(out, y, ws[QType.Q6_K], QType.Q6_K, scratch, same_input=True)
    assert same_bits(out, fresh[QType.Q6_K])
    K.matmul(out, y, ws[QType.Q6_K], QType.Q6_K, scratch)
    assert not same_bits(out, fresh[QType.Q6_K])
