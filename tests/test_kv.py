"""The quantized KV cache (edgert.quant.kv): each kernel against its numpy reference, rollback,
and the caches inside a model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY
from edgert.quant import kv as KV
from edgert.quant import kv_kernels as KQ

from edgert import kernels as K
from edgert import loader
from edgert.cache import KVCache
from edgert.errors import OptionError
from edgert.generate import Session

rng = np.random.default_rng(5)
H, D = 2, 64


def _kv(n, h=H, d=D):
    k = rng.standard_normal((n, h, d)).astype(np.float32)
    k[..., 3] += 8.0  # an outlier channel, as real keys have
    v = rng.standard_normal((n, h, d)).astype(np.float32)
    return k, v


def test_f16_bits_match_numpy():
    x = np.concatenate(
        [rng.standard_normal(5000) * 10.0 ** rng.integers(-9, 5, 5000), [0.0, -0.0, 1e-8, 6e-5, 7e4, 1e6]]
    ).astype(np.float32)
    codes = np.zeros((1, 1, x.size), np.uint8)
    scale, minv = np.zeros((1, 1, x.size), np.uint16), np.zeros((1, 1, x.size), np.uint16)
    KQ.quantize_rows(codes, scale, minv, x.reshape(1, 1, -1), 0, 8, 1, K.F16_TABLE)  # groups of 1: min = x
    with np.errstate(over="ignore"):  # 7e4 and 1e6 overflow to inf, in both
        np.testing.assert_array_equal(minv[0, 0], x.astype(np.float16).view(np.uint16))


def _written(cache, ks, vs):
    """A cache fed the chunks of (ks, vs) in turn; returns all k, v as [H, N, D]."""
    pos = 0
    for k, v in zip(ks, vs, strict=True):
        cache.update(k, v, pos)
        pos += len(k)
    return np.concatenate(ks).transpose(1, 0, 2), np.concatenate(vs).transpose(1, 0, 2)


def _held(cache):
    """Everything the cache holds, dequantized, as [H, offset, D] float32."""
    qk, qv = cache.dequantize(0, cache.n_quant)
    r = cache.offset - cache.n_quant
    rk = cache.res_k[:, :r].astype(np.float32)
    return np.concatenate([qk, rk], 1), cache.dequantize(0, cache.offset)[1]


@pytest.mark.parametrize("bits,d", [(8, 64), (4, 64), (4, 96)])  # 96: nibble runs of gcd(32, 48)
def test_store_matches_reference(bits, d):
    c = KV.QuantKVCache(H, d, 400, bits)
    chunks = [1, 63, 64, 17, 1, 1, 30, 60]
    ks, vs = zip(*(_kv(n, d=d) for n in chunks), strict=True)
    k, v = _written(c, ks, vs)
    n = sum(chunks)
    assert c.offset == n
    assert c.n_quant == (n if bits == 8 else max(0, n - KV.SLACK) // KV.GROUP * KV.GROUP)
    want_k, want_v = KQ.cache_ref(k, v, bits, KV.GROUP, c.channel_group, c.n_quant, c.sink, KV.RECENT)
    got_k, got_v = _held(c)
    # the codes match exactly; fma in the dequantization differs from numpy by float rounding
    np.testing.assert_allclose(got_k, want_k, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-6, atol=1e-6)
    err = np.abs(want_k[:, : c.n_quant] - k[:, : c.n_quant]).mean()
    assert err < (0.02 if bits == 8 else 0.35)  # and the quantization is sane


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "h,T,n0,window,softcap",
    [
        (H, 5, 180, 0, 0.0),
        (H, 5, 180, 50, 0.0),
        (H, 5, 180, 0, 20.0),
        (H, 1, 1500, 0, 0.0),  # one token over a long cache: positions split into chunks
        (1, 1, 1500, 0, 0.0),  # ... on one KV head
        (1, 3, 1500, 700, 0.0),  # ... a sliding window
        (H, 1, 1500, 0, 20.0),
    ],
)
def test_attention_matches_reference(bits, h, T, n0, window, softcap):
    Hq = 3 * h
    c = KV.QuantKVCache(h, D, n0 + T, bits)
    k0, v0 = _kv(n0, h)
    k1, v1 = _kv(T, h)
    k, v = _written(c, [k0, k1], [v0, v1])
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    out = np.empty_like(q)
    scores = np.zeros((T * Hq, n0 + T), np.float32)
    c.attend(out, q, n0, 0.125, window, softcap, scores, K.AttentionScratch(Hq, h, D))
    kq, vq = KQ.cache_ref(k, v, bits, KV.GROUP, c.channel_group, c.n_quant, c.sink, KV.RECENT)
    ref = K.attention_ref(q, kq, vq, n0, 0.125, window, softcap)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_exp_matches_numpy():
    x = np.concatenate([-np.geomspace(1e-8, 87, 20000), [0.0, -0.0, -1e-30]]).astype(np.float32)
    got = np.empty_like(x)
    KQ.exp_ref(x, got)
    want = np.exp(x.astype(np.float64))
    assert np.abs(got / want - 1).max() < 5e-7
    got = np.empty(3, np.float32)
    KQ.exp_ref(np.array([-88.0, -200.0, -np.inf], np.float32), got)
    assert (got >= 0).all() and (got < 1e-37).all()  # below the clamp: tiny, never negative or nan


@pytest.mark.parametrize("bits", [8, 4])
def test_rollback_within_slack_is_exact(bits):
    c = KV.QuantKVCache(H, D, 300, bits)
    chunks = [70, 9, 5, 16, 3]  # the 16-token write quantizes a group
    ks, vs = zip(*(_kv(n) for n in chunks), strict=True)
    _written(c, ks[:4], vs[:4])
    before = [a.copy() for a in _held(c)] + [c.offset, c.n_quant]
    for n in (16, 1, 5):
        c.update(ks[4], vs[4], c.offset)
        c.trim(3)
        c.trim(n)
        c.update(np.concatenate(ks)[c.offset : 100], np.concatenate(vs)[c.offset : 100], c.offset)
        after = list(_held(c)) + [c.offset, c.n_quant]
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)


def test_deep_rollback_reopens_groups():
    c = KV.QuantKVCache(H, D, 400, 4)
    k, v = _kv(300)
    c.update(k, v, 0)
    held_k, _ = _held(c)
    assert c.n_quant == 256
    c.trim(300 - 150)  # into the group 128..191
    assert (c.offset, c.n_quant) == (150, 128)
    again_k, _ = _held(c)
    np.testing.assert_allclose(again_k, held_k[:, :150], atol=1e-2)  # the quantized values, in fp16
    c.update(k[150:], v[150:], 150)
    assert (c.offset, c.n_quant) == (300, 256)
    np.testing.assert_allclose(_held(c)[0], held_k, atol=0.5)  # re-quantized: close to before


def test_bytes():
    d, h, n = 64, 3, 4096
    fp16 = KV.bytes_per_token(16, h, d)
    assert fp16 == 2 * h * d * 2
    assert KV.bytes_per_token(8, h, d) == pytest.approx(0.5625 * fp16)
    assert KV.bytes_per_token(4, h, d) <= 0.3 * fp16
    c = KV.QuantKVCache(h, d, n, 4)
    c.update(*_kv(n, h, d), 0)
    assert c.nbytes == KV.cache_bytes(4, 1, h, d, n)
    assert c.nbytes < 0.3 * n * fp16  # the fp16 key residual and sink included
    with pytest.raises(OptionError, match="16, 8, 4"):
        KV.check_kv_bits(3)


@pytest.fixture(scope="module")
def gemma_tiny():
    """Tiny gemma3: grouped-query attention (4 heads on 2) and sliding-window layers (window 8)."""
    return loader.open_source(TINY / "gemma3")


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_session_rollback_at_every_setting(gemma_tiny, bits):
    s = Session(loader.build(gemma_tiny, context=256, max_tokens=64, kv_bits=bits), gemma_tiny.tokenizer)
    ids = np.random.default_rng(7).integers(0, gemma_tiny.args.vocab_size, 190)
    s.forward(ids[:150])  # 4-bit: positions 0..127 quantized, the rest in the residual
    first = s.forward(ids[150:166], all_logits=True)
    s.trim(16)
    np.testing.assert_array_equal(s.forward(ids[150:166], all_logits=True), first)
    s.trim(100)  # deep: 4-bit re-opens groups (and the chunks differ), so only close
    again = s.forward(ids[66:166], all_logits=True)[-16:]
    if bits == 4:
        assert np.abs(again - first).mean() < 0.03 and np.abs(again - first).max() < 0.3  # logits ~1
    else:
        np.testing.assert_array_equal(again, first)


def test_quantized_caches_in_a_model(gemma_tiny):
    """16 bits is the plain fp16 cache; 8 and 4 bits stay close to it."""
    model = loader.build(gemma_tiny, context=256, max_tokens=64)
    ids = np.random.default_rng(8).integers(0, gemma_tiny.args.vocab_size, 200).astype(np.int32)

    def logits(cache):
        return np.concatenate([model(ids[i : i + 64], cache, i, True).copy() for i in range(0, 200, 64)])

    plain = [KVCache(2, 16, 256) for _ in model.layers]
    ref = logits(plain)
    assert isinstance(model.make_cache()[0], KVCache)
    np.testing.assert_array_equal(logits(model.make_cache(16)), ref)
    for bits, tol in ((8, 0.02), (4, 0.3)):
        got = logits(model.make_cache(bits))
        assert np.abs(got - ref).mean() < tol * np.abs(ref).mean(), bits
        # 4-bit: measured 0.84. Random weights give values without structure, and all but the
        # newest 32 of these 200 positions hold 4-bit values (real models: edgert perplexity)
        assert (got.argmax(-1) == ref.argmax(-1)).mean() > (0.94 if bits == 8 else 0.8)


def test_plan_counts_the_quantized_cache():
    from edgert.offload.memory import Memory
    from edgert.offload.plan import kv_bytes_per_token, plan_model
    from edgert.offload.profile import load_profile

    src = loader.open_source(TINY / "gemma3")
    a, ctx = src.args, 256
    for bits in (16, 8, 4):
        cache = loader.build(src, context=ctx, kv_bits=bits).make_cache()
        for c in cache:
            (c.update_and_fetch if isinstance(c, KVCache) else c.update)(
                *_kv(ctx, a.n_kv_heads, a.head_dim), 0
            )
        assert kv_bytes_per_token(a, kv_bits=bits, context=ctx) * ctx == pytest.approx(
            sum(c.nbytes for c in cache), abs=ctx
        )
    plans = {
        b: plan_model(src.store, a, Memory(1 << 30), ctx, load_profile("laptop-8gb"), kv_bits=b)
        for b in (16, 4)
    }
    assert plans[4].kv.bytes == kv_bytes_per_token(a, kv_bits=4, context=ctx) * ctx < plans[16].kv.bytes
