"""The offload plan: Memory, residency units, device profiles, the planner and `edgert plan`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_MODELS, TINY, cache_dir
from edgert.offload import units as units_module
from edgert.offload.memory import Memory, _malloc_trim, release_library_pages
from edgert.offload.plan import (
    DEFAULT_OVERHEAD,
    GOOD_WINDOW,
    LEAN_WINDOW,
    MIN_WINDOW,
    kv_bytes_per_token,
    plan,
    plan_model,
    workspace_bytes,
)
from edgert.offload.profile import (
    DeviceProfile,
    load_profile,
    measure_disk,
    save_profile,
    shipped_profiles,
)
from edgert.offload.stream import slot_bytes
from edgert.offload.units import SPLIT_FFN, Unit, units

from edgert.errors import BudgetError, FormatError
from edgert.loader import open_source
from edgert.models.base import Shard, Workspace

MiB = 1 << 20

# ---- Memory ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, n",
    [
        ("1.5GiB", 3 << 29),
        ("800MB", 800_000_000),
        ("2G", 2 << 30),
        ("512M", 512 << 20),
        ("4096", 4096),
        (" 64 kib ", 64 << 10),
        ("1e3", 1000),
        ("0.5 TB", 500_000_000_000),
    ],
)
def test_memory_parse(text, n):
    assert Memory.parse(text).bytes == n


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5M", "1.2.3G", "G", "inf", "1e999G"])
def test_memory_parse_rejects(text):
    with pytest.raises(ValueError, match="memory size"):
        Memory.parse(text)


def test_memory_arithmetic_and_format():
    a, b = Memory.parse("1GiB"), Memory.parse("512MiB")
    assert a + b == Memory(3 << 29) and a - b == b and b * 2 == a and a / 2 == b and a / b == 2.0
    assert b < a and max(a, b) == a and sum([a, b]) == Memory(3 << 29)
    assert str(a) == "1.00 GiB" and str(Memory(512)) == "512 B" and str(Memory(300 << 20)) == "300 MiB"
    with pytest.raises(ValueError):
        b - a  # sizes are never negative


@pytest.mark.skipif(_malloc_trim() is None, reason="malloc_trim is glibc's")
def test_release_free_heap_returns_freed_memory():
    """What a process freed but the allocator kept (opening a model frees its tokenizer's
    transient strings) leaves the resident set that the budget's overhead is measured from.
    In a fresh process: pytest's own heap would blur the figure."""
    code = (
        "import gc, psutil\n"
        "from edgert.offload.memory import release_free_heap\n"
        "junk = [b'x' * 1000 + i.to_bytes(4, 'little') for i in range(200_000)]\n"
        "keep = junk[::1000]  # pins the heap's top: only trimming gives the pages back\n"
        "del junk\n"
        "gc.collect()\n"
        "before = psutil.Process().memory_info().rss\n"
        "release_free_heap()\n"
        "print(before - psutil.Process().memory_info().rss)\n"
    )
    freed = int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert freed > 150 << 20, f"{freed >> 20} MiB of ~200 freed"


def test_release_library_pages_hands_back_llvms_pages_and_kernels_still_run():
    """After `import numba` tens of MiB of libllvmlite are resident that no kernel call runs.
    Handing them back leaves none that only this process maps (pages that another process
    maps too, here pytest's own, are the kernel's to keep, and the budget then counts them
    as measured), and a function compiled before still runs. A fresh process: the figures
    are this library's pages only."""
    code = (
        "import numba, numpy as np\n"
        "from edgert.offload.memory import release_library_pages\n"
        "def kib(field):\n"
        "    n, kb = False, 0\n"
        "    for line in open('/proc/self/smaps'):\n"
        "        if '-' in line.split(' ', 1)[0]:\n"
        "            n = line.rstrip().endswith('libllvmlite.so')\n"
        "        elif n and line.startswith(field + ':'):\n"
        "            kb += int(line.split()[1])\n"
        "    return kb\n"
        "f = numba.njit(lambda a: a.sum() * 2)\n"
        "f(np.ones(3))\n"
        "before = kib('Rss')\n"
        "release_library_pages()\n"
        "print(before, kib('Rss'), kib('Private_Clean'), f(np.ones(4)))\n"
    )
    release_library_pages()  # pytest's own: a page both map stays (after compiles here, all of them)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after, private, value = out.split()
    assert int(before) - int(after) > 10 << 10, out  # KiB: 31-70 MiB measured
    assert int(private) < 1 << 10 and float(value) == 8.0, out


# ---- units ----------------------------------------------------------------------------


def _sources(real_model):
    return [open_source(real_model(k)) for k in REAL_MODELS] + [open_source(TINY / "qwen3_moe")]


def _covered(us: list[Unit]) -> list[tuple]:
    """(path, start, end) of every byte the units read, sorted."""
    out = []
    for u in us:
        for r in u.ranges:
            out += [
                (str(r.path), r.offset + k * r.stride, r.offset + k * r.stride + r.nbytes)
                for k in range(r.repeat)
            ]
    return sorted(out)


@pytest.mark.parametrize("split_ffn", [SPLIT_FFN, 0], ids=["by-size", "projections"])
def test_units_cover_every_tensor_once(real_model, split_ffn, monkeypatch):
    monkeypatch.setattr(units_module, "SPLIT_FFN", split_ffn)  # 0: every FFN projection a unit
    for src in _sources(real_model):
        us = units(src.store, src.args)
        chunks = [u for u in us if u.rows is not None]  # a big head, split into row chunks
        names = [t for u in us if u.rows is None for t in u.tensors] + sorted({chunks[0].tensors[0]})
        assert sorted(names) == sorted(src.store.refs), src.path  # each tensor in exactly one unit
        rows = [u.rows for u in chunks]  # the chunks partition the head's rows, in order
        assert rows[0][0] == 0 and rows[-1][1] == src.args.vocab_size
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
        sizes = np.sort([u.nbytes for u in us if u.layer is not None])
        # half the layer bytes lie in units this size or smaller
        bulk = sizes[np.searchsorted(np.cumsum(sizes), sizes.sum() / 2)]
        assert all(u.nbytes <= bulk for u in chunks), "a chunk is larger than most layer bytes' units"
        assert sum(u.nbytes for u in us) == src.store.nbytes()
        spans = _covered(us)
        for (p0, _, e0), (p1, s1, _) in zip(spans, spans[1:], strict=False):
            assert p0 != p1 or e0 <= s1, "two units read the same bytes"
        for ref in src.store.refs.values():  # every tensor's bytes lie inside its unit's reads
            for u in (u for u in us if ref.name in u.tensors):
                part = ref.rows(*u.rows) if u.rows else ref
                assert any(r.offset <= part.offset and part.offset + part.nbytes <= r.end for r in u.ranges)
        assert {u.kind for u in us} <= {"embedding", "attention", "ffn", "expert", "head", "norms"}
        dense = [u for u in us if u.kind in ("attention", "ffn")]
        # a dense FFN's projections are units of their own where one is SPLIT_FFN or larger,
        # else the FFN is one unit; an MoE layer's FFN unit is its router
        largest = max(r.nbytes for n, r in src.store.refs.items() if ".ffn_" in n and n.startswith("blk."))
        split = not src.args.n_experts and largest >= split_ffn
        per_layer = 4 if split else 2
        assert len(dense) == per_layer * src.args.n_layers and all(u.per_token == 1.0 for u in dense)
        names = [u.name for u in us if u.layer == 0]
        if split:  # forward order: the dense FFN as gate, up, down
            assert names == ["blk.0.attention", "blk.0.ffn_gate", "blk.0.ffn_up", "blk.0.ffn_down"]
        elif not src.args.n_experts:
            assert names == ["blk.0.attention", "blk.0.ffn"]
            assert len(next(u for u in us if u.name == "blk.0.ffn").tensors) == 3


def test_unit_resident_bytes_are_what_loading_holds(real_model):
    """A unit's resident size is what loading it holds: its matrices as `pack` makes them
    (records the size of the blocks), column slices of a shard included."""
    from edgert.quant.pack import pack

    from edgert.models.base import _cols

    src = open_source(real_model("gemma3-270m"))  # Q4_K, Q5_0, Q6_K and Q8_0 matrices
    a = src.args
    half = Shard(range(0, 1), range(a.ffn_dim // 2), range(0), range(0))
    for shard in (None, half):
        us = [u for u in units(src.store, a, shard) if u.layer in (0, 3) or (u.rows or (1,))[0] == 0]
        assert any(u.rows for u in us)  # the first row chunk of the (tied) head
        for u in us:
            held = 0
            for r in u.parts:
                ref = src.store.ref(r.name)
                if len(ref.shape) == 1:
                    held += src.store.f32(ref.name).nbytes
                    continue
                raw = src.store.raw(ref)
                if u.rows is not None:  # a head chunk
                    raw = raw[u.rows[0] : u.rows[1]]
                elif shard is not None and r.name.endswith(("ffn_down.weight", "attn_output.weight")):
                    k = a.head_dim * a.n_heads // a.n_kv_heads if "attn" in r.name else a.ffn_dim // 2
                    raw = _cols(raw, ref, range(0, k))
                elif shard is not None:
                    raw = raw[: r.n_rows]
                held += pack(raw, ref.qtype).data.nbytes
            assert u.resident_bytes == held, (u.name, shard)
        if shard is None:  # records are the size of the blocks (Gemma's rows come in whole groups of 16)
            assert all(u.resident_bytes == u.nbytes for u in us if u.kind != "norms")


def test_units_merge_reads(real_model):
    src = open_source(real_model("qwen2.5-coder-0.5b"))
    us = {u.name: u for u in units(src.store, src.args)}
    # q, k, v, o and their biases sit together in the file: one read per block
    assert len(us["blk.0.attention"].ranges) == 1 and len(us["blk.0.ffn"].ranges) == 1
    assert us["head.0"].kind == "head" and us["embedding"].per_token < 1e-4  # untied: rows on demand
    smol = open_source(real_model("smollm2-135m"))
    emb = next(u for u in units(smol.store, smol.args) if u.kind == "embedding")
    assert emb.per_token == 1.0  # tied: the embedding is the output head, read whole


def test_units_moe_experts():
    src = open_source(TINY / "qwen3_moe")
    a = src.args
    us = units(src.store, a)
    experts = [u for u in us if u.kind == "expert"]
    assert len(experts) == a.n_layers * a.n_experts
    assert {(u.layer, u.expert) for u in experts} == {
        (i, e) for i in range(a.n_layers) for e in range(a.n_experts)
    }
    assert all(u.per_token == a.n_experts_used / a.n_experts and len(u.tensors) == 3 for u in experts)
    ffn = next(u for u in us if u.name == "blk.0.ffn")
    assert ffn.tensors == ("blk.0.ffn_gate_inp.weight",)  # the router


def test_units_shard():
    src = open_source(TINY / "qwen3_moe")
    a = src.args
    full = {u.name: u for u in units(src.store, a)}
    half = Shard(
        range(a.n_kv_heads // 2), range(a.ffn_dim), range(a.n_experts // 2), range(a.expert_ffn_dim // 2)
    )
    sh = {u.name: u for u in units(src.store, a, half)}
    assert "blk.0.expert.3" not in sh and "blk.0.expert.0" in sh  # other devices' experts are not ours
    assert sh["blk.0.expert.0"].nbytes == full["blk.0.expert.0"].nbytes // 2
    assert sh["blk.0.attention"].nbytes == full["blk.0.attention"].nbytes // 2
    strided = [r for r in sh["blk.0.attention"].ranges if r.repeat > 1]  # attn_output's column slice
    assert len(strided) == 1 and strided[0].repeat == a.dim and strided[0].stride == 2 * strided[0].nbytes
    # the pieces of all shards tile the full unit's bytes exactly
    other = Shard(
        range(a.n_kv_heads // 2, a.n_kv_heads), range(a.ffn_dim), range(a.n_experts), range(a.expert_ffn_dim)
    )
    sh2 = {u.name: u for u in units(src.store, a, other)}
    both = _covered([sh["blk.0.attention"], sh2["blk.0.attention"]])
    assert sum(e - s for _, s, e in both) == full["blk.0.attention"].nbytes
    assert all(e0 <= s1 for (_, _, e0), (_, s1, _) in zip(both, both[1:], strict=False))  # disjoint


# ---- sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3_moe", "gemma3", "llama"])
def test_workspace_estimate_is_close_to_the_real_buffers(arch):
    src = open_source(TINY / arch)
    a = src.args
    ws = Workspace(a, Shard.full(a), 64, 256)
    real = sum(v.nbytes for v in vars(ws).values() if isinstance(v, np.ndarray))
    real += sum(v.nbytes for v in vars(ws.scratch).values() if isinstance(v, np.ndarray))
    import numba

    est = workspace_bytes(a, 256, 64, numba.config.NUMBA_NUM_THREADS)
    rope = (2 if a.sliding_window or a.sliding_layers else 1) * 2 * 256 * (a.n_rot // 2) * 4
    # MatmulScratch's buffers change as the kernels do; the estimate needs to be close, not exact
    assert 0.75 * real <= est - rope <= 1.25 * real


def test_kv_bytes_per_token():
    src = open_source(TINY / "qwen3_moe")
    a = src.args
    assert kv_bytes_per_token(a) == 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2


# ---- the planner ----------------------------------------------------------------------

PROFILE = DeviceProfile("test", 8 << 30, 500e6, 10e9, 4, 5e9)
# Kernels slow beside the disk: any run of resident units outlasts 3 slots' reads, so the
# window is not trimmed below GOOD_WINDOW
SLOW_KERNELS = DeviceProfile("slow-kernels", 8 << 30, 500e6, 10e9, 4, 0.1e9)


def _toy(n_layers=8, attn=2 * MiB, ffn=6 * MiB, head=40 * MiB, norms=64 << 10):
    us = [Unit("embedding", "embedding", None, None, (), 30 * MiB, ("token_embd.weight",), 1e-4)]
    for i in range(n_layers):
        us.append(Unit(f"blk.{i}.attention", "attention", i, None, (), attn, (f"a{i}",)))
        us.append(Unit(f"blk.{i}.ffn", "ffn", i, None, (), ffn, (f"f{i}",)))
    us.append(Unit("head", "head", None, None, (), head, ("output.weight",)))
    us.append(Unit("norms", "norms", None, None, (), norms, ("n",)))
    return us


def _plan(us, budget, **kw):
    args = dict(context=1024, kv_bytes_per_token=16 << 10, profile=PROFILE, overhead=Memory(100 * MiB))
    args.update(kw)
    return plan(us, Memory(budget), **args)


def _check(p, us):
    by = {u.name: u for u in us}
    assert p.used <= p.budget
    parts = p.overhead + p.kv + p.workspace + p.pinned_bytes + p.window_bytes
    assert parts == p.used
    assert set(p.pinned) | set(p.streamed) | set(p.on_demand) == set(by)
    assert not set(p.pinned) & set(p.streamed)
    if p.streamed:
        assert p.window >= MIN_WINDOW and p.slot.bytes == max(by[n].nbytes for n in p.streamed)
    else:
        assert p.window == 0


def test_plan_fits_and_never_streams_more_with_more_budget():
    """More budget first deepens the window to GOOD_WINDOW slots (streaming a little more, so
    that the reader never idles), then never makes a plan stream more."""
    us = _toy()
    minimum = _plan(us, 10 << 30).minimum
    last = None
    for budget in range(minimum.bytes, minimum.bytes + 140 * MiB, 3 * MiB + 12345):
        p = _plan(us, budget, profile=SLOW_KERNELS)
        _check(p, us)
        assert p.minimum == minimum
        if last is not None and last.window >= GOOD_WINDOW:
            assert p.streamed_per_token <= last.streamed_per_token
        last = p
    assert _plan(us, minimum.bytes + 2 * 6 * MiB, profile=SLOW_KERNELS).window == GOOD_WINDOW
    full = _plan(us, 10 << 30)
    assert full.streamed == () and full.on_demand == () and full.streamed_per_token == Memory(0)


def test_plan_minimum_pins_the_big_head_and_refuses_below_it():
    us = _toy()
    p = _plan(us, 10 << 30)
    # min over slot sizes: pinning the 40 MiB head and streaming 6 MiB blocks beats 2 x 40 MiB slots
    expect = 100 * MiB + 1024 * (16 << 10) + (64 << 10) + 40 * MiB + 2 * 6 * MiB
    assert p.minimum.bytes == expect
    at_min = _plan(us, expect)
    _check(at_min, us)
    assert "head" in at_min.pinned and at_min.window == 2 and at_min.slot == Memory(6 * MiB)
    with pytest.raises(BudgetError) as e:
        _plan(us, expect - 1)
    need = -(-expect // MiB)
    assert (
        f"{need} MiB" in str(e.value) and f"{expect:,}" in str(e.value) and "--memory-budget" in str(e.value)
    )


def test_plan_pins_whole_layers_spread_through_the_depth_and_deepens_the_window():
    us = _toy()
    base = _plan(us, 10 << 30).minimum.bytes
    p = _plan(us, base + 2 * 6 * MiB + 3 * 8 * MiB, profile=SLOW_KERNELS)  # two more slots, then three layers
    assert p.window == GOOD_WINDOW
    layers = {int(n.split(".")[1]) for n in p.pinned if n.startswith("blk.")}
    assert layers == {0, 4, 2}  # spread out, so that streamed layers alternate with resident ones
    assert {f"blk.{i}.{k}" for i in layers for k in ("attention", "ffn")} <= set(p.pinned)
    q = _plan(us, base + 7 * MiB - 1)  # not a layer, but room for a third slot
    assert q.window >= 2 and q.used <= q.budget


def test_plan_trims_the_window_where_resident_runs_are_short():
    """One slot fewer (and one more slot's worth pinned) where 3 slots hold what the disk reads
    while the kernels go through the longest run of resident units; 4 where they do not."""
    us = _toy()
    budget = _plan(us, 10 << 30).minimum.bytes + 2 * 6 * MiB + 3 * 8 * MiB
    fast, slow = _plan(us, budget), _plan(us, budget, profile=SLOW_KERNELS)
    _check(fast, us)
    assert slow.window == GOOD_WINDOW and fast.window == LEAN_WINDOW
    assert fast.pinned_bytes > slow.pinned_bytes and fast.streamed_per_token < slow.streamed_per_token
    # the longest resident run: the head, and the first layer after it (the ring wraps)
    by = {u.name: u for u in us}
    assert {"head", "blk.0.attention", "blk.0.ffn"} <= set(fast.pinned)
    run = by["head"].nbytes + by["blk.0.attention"].nbytes + by["blk.0.ffn"].nbytes
    assert run * PROFILE.disk_read_bps / PROFILE.kernel_bps <= LEAN_WINDOW * fast.slot.bytes
    assert run * SLOW_KERNELS.disk_read_bps / SLOW_KERNELS.kernel_bps > LEAN_WINDOW * slow.slot.bytes


def test_plan_predicts_the_bottleneck():
    us = _toy()
    slow_disk = DeviceProfile("sd", 8 << 30, 80e6, 10e9, 4, 5e9)
    p = _plan(us, _plan(us, 10 << 30).minimum.bytes, profile=slow_disk)
    assert p.bottleneck == "disk" and p.seconds_per_token == pytest.approx(
        p.streamed_per_token.bytes / 80e6, rel=1e-3
    )
    slow_cpu = DeviceProfile("cpu", 8 << 30, 3e9, 50e9, 4, 0.5e9)
    q = _plan(us, 10 << 30, profile=slow_cpu)
    assert q.bottleneck == "compute" and q.seconds["disk"] == 0


def test_plan_moe_pins_dense_before_experts():
    src = open_source(TINY / "qwen3_moe")
    us = units(src.store, src.args)
    dense = sum(u.nbytes for u in us if u.kind in ("attention", "ffn", "head"))
    lo = plan_model(src.store, src.args, Memory(10 << 30), 64, PROFILE).minimum
    # two pools of slots (the ring, the expert cache), each deepened to GOOD_WINDOW
    deeper = 2 * (GOOD_WINDOW - MIN_WINDOW) * max(u.nbytes for u in us if u.kind != "norms")
    p = plan_model(src.store, src.args, lo + Memory(dense + deeper), 64, PROFILE)
    kinds = {u.name: u.kind for u in us}
    assert all(kinds[n] == "expert" for n in p.streamed)
    assert p.window == 0 and p.used <= p.budget  # no dense unit streams: no ring


def test_plan_to_dict_is_json():
    p = _plan(_toy(), 300 * MiB)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["budget"] == 300 * MiB and d["bottleneck"] in ("disk", "memory", "compute")
    assert d["window"] == p.window and d["pinned"] == list(p.pinned)


def test_plan_real_model(real_model):
    src = open_source(real_model("qwen2.5-coder-0.5b"))
    prof = load_profile("raspberry-pi-5-8gb-nvme")
    lo = plan_model(src.store, src.args, Memory(8 << 30), 4096, prof)
    assert lo.streamed == () and lo.bottleneck == "compute"
    p = plan_model(src.store, src.args, lo.minimum, 4096, prof)
    assert p.used <= p.budget and p.window == 2 and p.pinned == ("norms",)  # the head streams in chunks
    assert p.slot.bytes == max(slot_bytes(u) for u in units(src.store, src.args) if u.name in p.streamed)
    with pytest.raises(BudgetError, match="minimum working set"):
        plan_model(src.store, src.args, Memory(int(0.4 * src.store.nbytes())), 4096, prof)
    assert DEFAULT_OVERHEAD.bytes > 150 * MiB


# ---- profiles -------------------------------------------------------------------------


def test_shipped_profiles_load_and_cite_every_figure():
    names = shipped_profiles()
    assert {"raspberry-pi-5-8gb-nvme", "raspberry-pi-5-8gb-sd", "jetson-orin-nano-8gb", "laptop-8gb"} <= set(
        names
    )
    for n in names:
        p = load_profile(n)
        assert p.name == n and p.ram_bytes == 8 << 30
        assert {"ram", "disk_read_per_s", "memory_per_s", "kernel_per_s", "cores"} <= set(p.sources)
    assert (
        load_profile("raspberry-pi-5-8gb-sd").disk_read_bps
        < load_profile("raspberry-pi-5-8gb-nvme").disk_read_bps
    )


def test_profile_toml_round_trip(tmp_path):
    p = DeviceProfile(
        "box", 3 << 30, 1.23e9, 7.8e9, 2, 7.9e8, "a test", {"ram": 'says "who"'}, ("kernel_per_s",)
    )
    q = load_profile(save_profile(p, tmp_path / "box.toml"))
    assert q == p and q.sources == p.sources


def test_profile_errors(tmp_path):
    with pytest.raises(FormatError, match="laptop-8gb"):
        load_profile("no-such-device")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nram = "8GiB"\n')
    with pytest.raises(FormatError, match="missing"):
        load_profile(bad)


def test_measure_disk(tmp_path):
    bps, how = measure_disk(tmp_path, 8 << 20)
    assert bps > 1e6 and ("O_DIRECT" in how or "fadvise" in how)


# ---- the command line -----------------------------------------------------------------


def edgert(*args):
    env = {**os.environ, "EDGERT_HOME": str(cache_dir())}
    return subprocess.run(
        [sys.executable, "-m", "edgert.apps.cli", *map(str, args)], capture_output=True, text=True, env=env
    )


def test_cli_plan(real_model):
    model = real_model("qwen2.5-coder-0.5b")
    r = edgert("plan", model, "--memory-budget", "600MiB", "--profile", "raspberry-pi-5-8gb-nvme")
    assert r.returncode == 0, r.stderr
    for word in ("pinned", "streamed", "window", "KV cache", "minimum", "tok/s", "bottleneck"):
        assert word in r.stdout
    r = edgert("plan", model, "-m", "600MiB", "--ctx", "2048", "--json", "--profile", "laptop-8gb")
    d = json.loads(r.stdout)
    assert d["context"] == 2048 and d["used"] <= d["budget"] == 600 * MiB and d["window"] >= 2
    r = edgert("plan", model, "-m", "40%", "--profile", "laptop-8gb")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "MiB or more" in r.stderr
    r = edgert("plan", model, "-m", "lots")
    assert r.returncode == 2 and "memory size" in r.stderr


def test_cli_profile_writes_a_loadable_profile(tmp_path, monkeypatch):
    from edgert.offload import profile as P

    monkeypatch.setattr(P, "measure_memory", lambda: 9e9)
    monkeypatch.setattr(P, "measure_kernel", lambda: 1e9)
    p = P.measure_profile("here", tmp_path)
    q = load_profile(save_profile(p, Path(tmp_path) / "here.toml"))
    assert q == p and q.cores >= 1 and q.ram_bytes > 1 << 30


def test_bulk_size_is_the_size_most_bytes_come_in():
    from edgert.offload.units import bulk_size

    mib = 1 << 20
    layers = [16 * mib] * 28 + [36 * mib] * 70 + [53 * mib] * 14  # the 7B Q4_K_M's layer units
    assert bulk_size(layers) == 36 * mib  # what the head is chunked to: the Q6_K downs can be pinned
    assert bulk_size([1, 2, 2, 8]) == 8  # the largest unit holds most bytes
    assert bulk_size([5]) == 5
