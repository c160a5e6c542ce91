"""Decode tok/s at a 4096-token context with the fp16, 8-bit and 4-bit KV caches, in one process.

Each cache is filled with random keys and values for positions 0..4063 (a decode step's cost
depends on the length, not on the contents), then 16 decode steps at positions 4064.. are
timed. The settings alternate over 5 rounds; the median round is printed.

    python tests/tools/kv_decode_bench.py MODEL THREADS
"""

from __future__ import annotations

import statistics
import sys
import time

import numba
import numpy as np

from edgert import loader
from edgert.cache import KVCache

FILLED, STEPS, ROUNDS = 4064, 16, 5


def main(model: str, threads: int) -> None:
    numba.set_num_threads(threads)
    src = loader.open_source(loader.resolve(model))
    m = loader.build(src, context=FILLED + STEPS + 1)
    a, rng = m.args, np.random.default_rng(0)
    k = (rng.standard_normal((FILLED, a.n_kv_heads, a.head_dim)) * 2).astype(np.float32)
    v = rng.standard_normal((FILLED, a.n_kv_heads, a.head_dim)).astype(np.float32)
    caches = {}
    for bits in (16, 8, 4):
        caches[bits] = m.make_cache(bits)
        for c in caches[bits]:
            (c.update_and_fetch if isinstance(c, KVCache) else c.update)(k, v, 0)
    tok = np.array([100], np.int32)
    tps = {b: [] for b in caches}
    for r in range(ROUNDS):
        for bits in list(caches) if r % 2 == 0 else list(caches)[::-1]:
            cache = caches[bits]
            for c in cache:
                c.trim(c.offset - FILLED)
            m(tok, cache, FILLED)  # warm
            t = time.perf_counter()
            for i in range(1, STEPS + 1):
                m(tok, cache, FILLED + i)
            tps[bits].append(STEPS / (time.perf_counter() - t))
    cells = [f"{b}-bit {statistics.median(x):.2f} tok/s [{min(x):.2f}-{max(x):.2f}]" for b, x in tps.items()]
    print(f"{src.path.name} threads {threads} ctx {FILLED + STEPS}: " + " · ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
