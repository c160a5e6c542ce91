"""Each numba kernel of edgert/kernels.py (and the router and sampler kernels) against its
numpy reference."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest

from edgert import kernels as K
from edgert.models.base import route
from edgert.sample import _candidates, make_sampler

rng = np.random.default_rng(0)


def test_rmsnorm():
    x = rng.standard_normal((5, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    K.rmsnorm(out, x, w, 1e-6)
    np.testing.assert_allclose(out, K.rmsnorm_ref(x, w, 1e-6), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out, K.rmsnorm_ggml_ref(x, w, 1e-6))  # ggml's rounding steps
    K.rmsnorm(x, x, w, 1e-6)  # in place, as the q/k norms use it
    np.testing.assert_allclose(x, out, rtol=0, atol=0)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope(neox, n_rot):
    T, H, D, pos0, base = 6, 3, 64, 37, 10000.0
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    cos = np.empty((64, n_rot // 2), np.float32)
    sin = np.empty_like(cos)
    K.rope_table(cos, sin, base, n_rot, np.ones(n_rot // 2), 1.0)
    y = x.copy()
    K.rope(y, cos, sin, pos0, neox)
    ref = K.rope_ref(x, pos0, base, n_rot, neox)
    np.testing.assert_allclose(y, ref, atol=2e-5)  # float32 angles, as ggml computes them
    np.testing.assert_array_equal(y, K.rope_ggml_ref(x, cos, sin, pos0, neox))  # and its FMAs
    np.testing.assert_array_equal(y[..., n_rot:], x[..., n_rot:])


def _qkv(T, Hq, Hkv, S, D):
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    k = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    v = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 30.0)])
def test_attention(window, softcap):
    q, k, v = _qkv(T=4, Hq=6, Hkv=2, S=20, D=16)
    out = np.empty_like(q)
    K.attention(out, q, k, v, 9, 0.25, window, softcap)
    ref = K.attention_ref(q, k, v, 9, 0.25, window, softcap)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _f16_case(T, Hkv, S, D):
    """An fp16-cache attention case: q, fp16 k and v, their uint16 views, out, scores, scratch."""
    Hq = 2 * Hkv
    q, k, v = _qkv(T=T, Hq=Hq, Hkv=Hkv, S=S, D=D)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    bits = (k16.view(np.uint16), v16.view(np.uint16))
    scores, scratch = np.zeros((T * Hq, S), np.float32), K.AttentionScratch(Hq, Hkv, D)
    return q, k16, v16, bits, np.empty_like(q), scores, scratch


def _exact_attention(q, k16, v16, pos0, window):
    return K.attention_ref(q, k16.astype(np.float32), v16.astype(np.float32), pos0, 0.2, window, 0.0)


def attention_f16_ref(q, k16, v16, pos0, scale, window):
    """ggml's non-flash attention over an fp16 cache: fp16(q) . K, softmax, fp16(p) . V."""
    T, Hq, D = q.shape
    group = Hq // k16.shape[0]
    out = np.zeros_like(q)
    q16 = q.astype(np.float16).astype(np.float32)
    for t in range(T):
        p = pos0 + t
        lo = 0 if window <= 0 else max(0, p - window + 1)
        for h in range(Hq):
            kk = k16[h // group, lo : p + 1].astype(np.float32)
            s = (kk.astype(np.float64) @ q16[t, h]).astype(np.float32) * np.float32(scale)
            e = np.exp(s - s.max()).astype(np.float32)
            w = (e * np.float32(1.0 / e.astype(np.float64).sum())).astype(np.float16).astype(np.float32)
            out[t, h] = w.astype(np.float64) @ v16[h // group, lo : p + 1].astype(np.float64)
    return out


@pytest.mark.parametrize(
    "T,Hkv,S,pos0,window",
    [
        (3, 2, 24, 12, 0),
        (3, 2, 24, 12, 6),
        (1, 3, 1500, 1499, 0),  # one token over a long cache: positions split across threads
        (1, 1, 1500, 1499, 0),
        (1, 1, 1500, 1499, 700),  # ... with a sliding window
    ],
)
def test_attention_f16(T, Hkv, S, pos0, window):
    q, k16, v16, (kb, vb), out, scores, scratch = _f16_case(T, Hkv, S, 32)
    K.attention_f16(
        out, q.copy(), kb, vb, pos0, 0.2, window, 0.0, scores, K.F16_TABLE, scratch.part, scratch.stats,
        scratch.rows, 2,
    )  # fmt: skip
    if S > 1000:  # the split took place: chunk 1 holds statistics
        assert scratch.stats[1, :T, :, 0].min() > 0
    # a probability that lands on an fp16 rounding boundary may round the other way
    np.testing.assert_allclose(out, attention_f16_ref(q, k16, v16, pos0, 0.2, window), atol=2e-3)
    # and against exact attention, the fp16 rounding costs < 1e-2
    np.testing.assert_allclose(out, _exact_attention(q, k16, v16, pos0, window), atol=1e-2)


@pytest.mark.parametrize(
    "T,Hkv,S,pos0,window,D",
    [
        (3, 2, 24, 12, 0, 32),  # a batch: tinyBLAS's order
        (3, 2, 24, 12, 6, 32),
        (5, 1, 200, 150, 0, 64),
        (1, 3, 300, 299, 0, 64),  # one token: ggml_vec_dot_f16's order
        (1, 1, 300, 299, 0, 80),  # ... with a head dimension that leaves a tail after blocks of 64
        (1, 1, 1500, 1499, 700, 64),  # ... with a sliding window
    ],
)
@pytest.mark.parametrize("in_batch", [False, True])  # True: the tokens are part of a batch of 40
def test_attention_f16_ggml(T, Hkv, S, pos0, window, D, in_batch):
    """Bit for bit llama.cpp's arithmetic (its numpy twin), and within fp16 noise of exact attention."""
    q, k16, v16, (kb, vb), out, scores, scratch = _f16_case(T, Hkv, S, D)
    batch = 40 if in_batch else T
    K.attention_f16_ggml(
        out, q.copy(), kb, vb, pos0, 0.2, window, 0.0, scores, K.F16_TABLE, scratch.lanes, batch
    )
    np.testing.assert_array_equal(out, K.attention_f16_ggml_ref(q, k16, v16, pos0, 0.2, window, batch))
    np.testing.assert_allclose(out, _exact_attention(q, k16, v16, pos0, window), atol=1e-2)


@nb.njit
def _expf_array(x, out):
    for i in range(x.shape[0]):
        out[i] = K.expf_ggml(x[i])


@nb.njit
def _sum16_rows(a, out):
    for r in range(a.shape[0]):
        out[r] = K.sum16(a[r], 0, 1)


def test_ggml_float_primitives():
    """expf_ggml and sum16 equal their numpy twins bit for bit; expf_ggml is within 2 ulp of exp."""
    x = np.concatenate(
        [rng.uniform(-110, 90, 20000), rng.standard_normal(5000), [0.0, -0.0, -np.inf, 200, -200]]
    )
    x = x.astype(np.float32)
    got = np.empty_like(x)
    _expf_array(x, got)
    np.testing.assert_array_equal(got, K.expf_ggml_ref(x))
    fine = np.abs(x) < 87
    np.testing.assert_array_max_ulp(
        got[fine], np.exp(x[fine].astype(np.float64)).astype(np.float32), maxulp=2
    )
    a = rng.standard_normal((50, 16)).astype(np.float32)
    sums = np.empty(50, np.float32)
    _sum16_rows(a, sums)
    np.testing.assert_array_equal(sums, K.sum16_ref(a))


def test_gated_activations():
    g = rng.standard_normal((3, 40)).astype(np.float32) * 3
    u = rng.standard_normal((3, 40)).astype(np.float32)
    for silu in (K._silu_mul_rows, K.swiglu):  # ggml's arithmetic: 16-wide, then the tail
        a = g.copy()
        silu(a, u)
        np.testing.assert_array_equal(a, K.silu_mul_ggml_ref(g, u))
        np.testing.assert_allclose(a, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
    c = np.concatenate([g, [[-12.0] * 40, [11.0] * 40]]).astype(np.float32)  # and past +-10
    uc = np.concatenate([u, u[:2]])
    y = c.copy()
    K.geglu_ggml(y, uc)  # llama.cpp parity: its fp16 GELU table, computed on the fly
    np.testing.assert_array_equal(y, K.geglu_ggml_ref(c, uc))
    b = g.copy()
    K.gelu_mul(b, u)
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    np.testing.assert_allclose(b, gelu * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renorm", [True, False])
def test_route(renorm):
    logits = rng.standard_normal((5, 8)).astype(np.float32)
    sel = np.zeros((5, 2), np.int32)
    w = np.zeros((5, 2), np.float32)
    route(logits, 2, renorm, sel, w)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(sel, top)
    want = np.take_along_axis(p, top, -1)
    if renorm:
        want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(w, want, rtol=1e-5)


def test_sampler_candidates():
    logits = rng.standard_normal(1000).astype(np.float32) * 3
    idx, val = np.empty(1000, np.int64), np.empty(1000, np.float64)
    inv_t = 1 / 0.7
    n = _candidates(logits, inv_t, 20, 0.05, idx, val)
    z = (logits.astype(np.float64) - logits.max()) * inv_t
    keep = np.nonzero(np.exp(z) >= 0.05)[0]
    keep = keep[np.argsort(-z[keep], kind="stable")][:20]
    assert n == len(keep)
    order = np.argsort(idx[:n])  # survivors come in any order; the sampler sorts them
    np.testing.assert_array_equal(idx[:n][order], np.sort(keep))
    np.testing.assert_allclose(val[:n][order], z[np.sort(keep)])


def test_samplers_are_values():
    logits = rng.standard_normal(500).astype(np.float32)
    assert make_sampler()(logits) == int(logits.argmax())
    assert make_sampler(0.8, top_k=1, seed=3)(logits) == int(logits.argmax())
    a = [make_sampler(1.0, seed=7)(logits) for _ in range(3)]
    s = make_sampler(1.0, seed=7)
    b = [s(logits) for _ in range(3)]
    assert a == [b[0]] * 3  # a fresh sampler with the same seed starts the same
    counts = np.bincount([s(logits) for _ in range(3000)], minlength=500)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = int(p.argmax())
    assert abs(counts[top] / 3000 - p[top]) < 0.03  # unfiltered sampling follows softmax
