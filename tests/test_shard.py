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
    out: list[np.ndarray | None] = [None, None]

    def run(i):
        out[i] = models[i](ids, models[i].make_cache(), 0, all_logits=True).copy()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for got in out:
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
