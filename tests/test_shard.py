"""The forward over shards: two devices' shards (half the KV heads, half the FFN columns or
half the experts each), whose partial sums meet in an in-process allreduce, compute the
same logits as the whole model on one device."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import TINY

from edgert import loader
from edgert.comm import LocalGroup
from edgert.models.base import Shard


def halves(r: range) -> tuple[range, range]:
    mid = r.start + len(r) // 2
    return range(r.start, mid), range(mid, r.stop)


def _run_group(group: LocalGroup, models_, tokens: np.ndarray, caches, pos: int) -> list[np.ndarray]:
    """One forward on every device of a group at once (their allreduce waits for all); a
    device's error is raised here, the others woken from their allreduce."""
    out: list = [None] * len(models_)
    errors: list[BaseException] = []

    def run(i):
        try:
            out[i] = models_[i](tokens, caches[i], pos, all_logits=True).copy()
        except BaseException as e:
            errors.append(e)
            group.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models_))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    assert all(o is not None for o in out), "a device did not finish"
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3_moe", "mixtral"])
def test_two_shards_equal_one_device(arch):
    src = loader.open_source(TINY / arch)
    full = Shard.full(src.args)
    ids = np.load(TINY / arch / "reference.npz")["prompt_ids"]

    whole = loader.build(src, context=64, max_tokens=32, kv_dtype=np.float32)
    want = whole(ids, whole.make_cache(), 0, all_logits=True).copy()

    kv, ffn, ex = halves(full.kv), halves(full.ffn), halves(full.experts)
    group = LocalGroup(2)
    shards = [Shard(kv[i], ffn[i], ex[i], full.expert_ffn) for i in range(2)]
    models = [
        loader.build(src, context=64, max_tokens=32, kv_dtype=np.float32, shard=s, comm=group.member(i))
        for i, s in enumerate(shards)
    ]
    out = _run_group(group, models, ids, [m.make_cache() for m in models], 0)
    for got in out:
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _least_plan(store, a, ctx: int, shard: Shard, packed: bool):
    """The shard's plan at the smallest budget it runs in, counting no runtime overhead."""
    from edgert.offload.memory import Memory
    from edgert.offload.plan import plan_model
    from edgert.offload.profile import default_profile

    prof, _ = default_profile(None)
    kw = dict(shard=shard, overhead=Memory(0), packed=packed)
    return plan_model(
        store, a, plan_model(store, a, Memory(1 << 40), ctx, prof, **kw).minimum, ctx, prof, **kw
    )


@pytest.mark.parametrize("quant", ["f32", "Q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_shards_stream_their_column_slices(arch, quant, tmp_path, monkeypatch):
    """Two devices each stream their own shard at the minimum budget, the column slices of
    attn_output and ffn_down (and of the experts' down) included, read as one piece each
    from the shard's own packed stream file, and their shares of q/k/v's biases (qwen2):
    through a prompt and decode steps they compute what the same shards compute resident,
    bit for bit. From the model file, which holds the slices strided, a plan pins them.

    Each FFN projection is a unit here, as in a model with large ones: with two layers of
    one small unit each, the minimum plan would pin everything."""
    from edgert.offload import packed
    from edgert.offload import units as units_module
    from edgert.offload.units import units

    from edgert import models
    from edgert.convert import convert

    monkeypatch.setattr(units_module, "SPLIT_FFN", 0)
    path = TINY / arch if quant == "f32" else convert(TINY / arch, tmp_path / f"{arch}.gguf", quant)
    src = loader.open_source(path)
    a, full = src.args, Shard.full(src.args)
    kv, ffn, ex, eff = halves(full.kv), halves(full.ffn), halves(full.experts), halves(full.expert_ffn)
    if a.n_experts:  # every expert on both devices, each with half of every expert's columns
        shards = [Shard(kv[i], ffn[i], full.experts, eff[i]) for i in range(2)]
    else:
        shards = [Shard(kv[i], ffn[i], ex[i]) for i in range(2)]
    mod, ctx = models.module_for(a.arch), 64
    resident, streamed, files = [], [], set()
    groups = LocalGroup(2), LocalGroup(2)
    for i, s in enumerate(shards):
        store = loader.open_source(path).store
        us = {u.name: u for u in units(store, a, s)}
        has_slice = {n for n, u in us.items() if u.strided}
        # from the model file a column slice cannot stream: every plan pins it
        raw = _least_plan(store, a, ctx, s, packed=False)
        assert has_slice <= set(raw.pinned) and (raw.streamed or a.n_experts)  # mixtral pins all
        p = _least_plan(store, a, ctx, s, packed=True)
        sliced = [n for n in p.streamed if n in has_slice]
        assert sliced, "no column slice streams"
        sf = packed.stream_file(path, store, list(us.values()), p.streamed, tmp_path / "cache", shard=repr(s))
        files.add(sf.path)
        comm = groups[1].member(i)
        m = mod.Model(a, store, ctx, shard=s, comm=comm, plan=p, stream_file=sf, kv_dtype=np.float32)
        for n in sliced:  # read from the shard's packed file, as pieces
            lay = (m.expert_cache if us[n].kind == "expert" else m.streamer).layout_of(n)
            assert lay.pieces and lay.path == sf.path
        streamed.append(m)
        store_r = loader.open_source(path).store
        resident.append(mod.Model(a, store_r, ctx, shard=s, comm=groups[0].member(i), kv_dtype=np.float32))
    assert len(files) == 2  # one packed stream file per shard
    try:
        caches = [[m.make_cache() for m in g] for g in (resident, streamed)]
        tokens, pos = np.arange(3, 15, dtype=np.int64), 0
        for _ in range(4):
            want = _run_group(groups[0], resident, tokens, caches[0], pos)
            got = _run_group(groups[1], streamed, tokens, caches[1], pos)
            for w, g in zip(want, got, strict=True):
                np.testing.assert_array_equal(g, w)
            pos += len(tokens)
            tokens = np.array([int(want[0][-1].argmax())])
        assert all(m.io_stats().bytes_read > 0 for m in streamed)
    finally:
        for m in streamed:
            m.close()
