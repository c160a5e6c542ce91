"""The packed stream file: streamed units read as packed records, built once, rebuilt when stale.

Streamed logits must equal resident ones bit for bit (both run the packed kernels); the file
is written once per model and reused, rebuilt when the model file or the file itself changes,
and never read as weights when it is truncated.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from edgert.offload import packed
from edgert.offload.units import units
from edgert.quant.pack import HAVE_VNNI, PackedWeight, pack

from edgert import loader, models
from edgert.convert import convert
from edgert.errors import CacheError

pytestmark = pytest.mark.skipif(not HAVE_VNNI, reason="packed records need AVX512-VNNI")

CTX = 128


def _budget(src, share: float = 0.4) -> int:
    """`share` of the weights plus what this process's plan needs besides them."""
    p = loader.make_plan(src, 1 << 40, CTX)
    norms = sum(u.nbytes for u in units(src.store, src.args) if u.kind == "norms")
    fixed = p.overhead.bytes + p.kv.bytes + p.workspace.bytes + norms
    return int(share * src.store.nbytes()) + fixed + (16 << 20)


def _stream_file(path: Path, cache: Path, calls: list | None = None):
    src = loader.open_source(path)
    plan = loader.make_plan(src, _budget(src), CTX)
    assert plan.packed and plan.streamed
    progress = (lambda *a: calls.append(a)) if calls is not None else None
    us = units(src.store, src.args)
    return src, plan, packed.stream_file(path, src.store, us, plan.streamed, cache, progress)


def test_block_packs_a_units_rows_as_pack_does(real_model):
    """A unit's block is its tensors' pack() records (raw bytes for the rest), PIECE_ALIGN
    apart, and a head row chunk's records are those rows of the whole tensor's packing."""
    src = loader.open_source(real_model("smollm2-135m"))
    us = units(src.store, src.args)
    attn = next(u for u in us if u.name == "blk.0.attention")
    b = packed.block(attn)
    assert b is not None and len(b.parts) == len(attn.tensors)
    for ref, piece in b.parts:
        assert piece.pos % packed.PIECE_ALIGN == 0 and piece.interleaved
        assert piece.nbytes == pack(src.store.raw(ref), ref.qtype).nbytes
    assert packed.slot_bytes(attn) == -(-b.nbytes // 4096) * 4096
    assert packed.block(next(u for u in us if u.kind == "norms")) is None  # float vectors: nothing to pack
    ref = src.store.ref("token_embd.weight")
    whole = pack(src.store.raw(ref), ref.qtype)
    rows = ref.rows(48, 96)
    part = pack(src.store.raw(rows), ref.qtype)
    group = whole.nbytes // -(-ref.n_rows // 16)
    assert np.array_equal(part.data, whole.data[3 * group : 6 * group])


def test_built_once_reused_and_rebuilt_when_stale(real_model, tmp_path):
    """The first load writes the file (with progress), the second reuses it untouched; a
    model file whose mtime changed, or a truncated packed file, is rebuilt, never read."""
    path = tmp_path / "model.gguf"
    shutil.copy(real_model("smollm2-135m"), path)
    cache = tmp_path / "cache"
    calls = []
    src, plan, sf = _stream_file(path, cache, calls)
    assert sf is not None and sf.path.parent == cache / "packed" and sf.path.is_file()
    assert calls and calls[-1][1] == calls[-1][2] and "packing" in calls[-1][0]
    assert {n for n in plan.streamed} <= set(sf.units)
    assert not list(sf.path.parent.glob("*.tmp"))  # the temporary file was renamed
    first = os.stat(sf.path)

    calls.clear()
    _, _, again = _stream_file(path, cache, calls)
    assert calls == [] and os.stat(again.path).st_ino == first.st_ino  # reused, not rewritten
    assert os.stat(again.path).st_mtime_ns == first.st_mtime_ns

    os.utime(path, ns=(first.st_mtime_ns + 10**9, first.st_mtime_ns + 10**9))  # the model "changed"
    assert packed.read_index(sf.path, loader.open_source(path).store) is None
    _, _, rebuilt = _stream_file(path, cache, calls)
    assert calls and os.stat(rebuilt.path).st_ino != first.st_ino

    size = os.stat(rebuilt.path).st_size
    os.truncate(rebuilt.path, size // 2)  # a crash or a full disk left half a file
    assert packed.read_index(rebuilt.path, loader.open_source(path).store) is None
    calls.clear()
    _, _, whole = _stream_file(path, cache, calls)
    assert calls and os.stat(whole.path).st_size == size


def test_holds_every_unit_so_any_plan_reuses_it(real_model, tmp_path):
    """Built for one plan, the file holds every unit that packs: another plan does not rewrite it."""
    src = loader.open_source(real_model("smollm2-135m"))
    us = units(src.store, src.args)
    store = src.store
    a = packed.stream_file(src.path, store, us, ["blk.0.attention"], tmp_path)
    assert set(a.units) == {u.name for u in us if packed.block(u) is not None}  # (a tied embedding)
    stat = os.stat(a.path)
    b = packed.stream_file(src.path, store, us, ["blk.1.ffn", "blk.7.attention"], tmp_path)
    assert b.units == a.units and os.stat(b.path).st_ino == stat.st_ino
    assert os.stat(b.path).st_mtime_ns == stat.st_mtime_ns


def test_unwritable_cache_is_a_typed_error(real_model, tmp_path):
    src = loader.open_source(real_model("smollm2-135m"))
    (tmp_path / "packed").write_text("a file where the folder should be")
    with pytest.raises(CacheError, match="cannot write the packed stream file"):
        packed.stream_file(src.path, src.store, units(src.store, src.args), ["blk.0.attention"], tmp_path)


def _same_logits(ref, m, tokens: np.ndarray, steps: int = 4) -> None:
    """Prompt logits and greedy decode steps of the streamed model `m` equal `ref`'s exactly."""
    caches = ref.make_cache(), m.make_cache()
    want, got = ref(tokens, caches[0], 0, all_logits=True), m(tokens, caches[1], 0, all_logits=True)
    np.testing.assert_array_equal(got, want)
    pos = len(tokens)
    for _ in range(steps):
        tok = np.array([int(want[-1].argmax())])
        want, got = ref(tok, caches[0], pos), m(tok, caches[1], pos)
        np.testing.assert_array_equal(got, want)
        pos += 1


def test_streamed_logits_equal_resident_bit_for_bit(real_model, tmp_path):
    """Under a budget, SmolLM2's streamed units are packed records in the slots, and its
    logits are the resident model's, bit for bit, through a prompt and decode steps."""
    path = real_model("smollm2-135m")
    src = loader.open_source(path)
    m = loader.build(src, CTX, memory_budget=_budget(src), cache_dir=tmp_path)
    ref = loader.build(loader.open_source(path), CTX)
    try:
        s = m.streamer
        assert s is not None and m.stream_file is not None
        assert all(lay.path == m.stream_file.path and lay.pieces for lay in s.layouts)
        assert s.slot_size == m.plan.slot.bytes
        view = m.attention(next(i for i in range(src.args.n_layers) if m.layers[i].wq is None))
        assert type(view.wq.w) is PackedWeight and view.wq.w.interleaved
        _same_logits(ref, m, np.array(src.tokenizer.encode("The capital of France is"), np.int64))
        st = m.io_stats()
        assert st.bytes_read >= sum(lay.reads[0].need for lay in s.layouts)
    finally:
        m.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_experts_stream_packed(arch, tmp_path):
    """A Q4_0 MoE whose dense units and experts all stream (the ring and the expert cache)
    reads packed records for both, and gives the resident model's logits bit for bit."""
    from edgert.offload.memory import Memory
    from edgert.offload.plan import plan_model
    from edgert.offload.profile import default_profile

    path = convert(TINY / arch, tmp_path / f"{arch}.gguf", "Q4_0")
    src = loader.open_source(path)
    prof, _ = default_profile(None)
    zero = Memory(0)
    lo = plan_model(src.store, src.args, Memory(1 << 40), 64, prof, overhead=zero, packed=True).minimum
    p = plan_model(src.store, src.args, lo, 64, prof, overhead=zero, packed=True)
    us = units(src.store, src.args)
    sf = packed.stream_file(path, src.store, us, p.streamed, tmp_path)
    mod = models.module_for(src.args.arch)
    ref = mod.Model(src.args, loader.open_source(path).store, 64)
    m = mod.Model(src.args, src.store, 64, plan=p, stream_file=sf)
    try:
        c = m.expert_cache
        assert m.streamer is not None and c is not None
        assert all(lay.pieces for lay in c.layouts.values())
        ring = m.streamer.layouts  # an MoE layer's router is float: its unit stays in the model file
        assert any(lay.pieces for lay in ring)
        assert all(bool(lay.pieces) == (packed.block(lay.unit) is not None) for lay in ring)
        assert max(m.streamer.slot_size, c.slot_size) <= p.slot.bytes
        _same_logits(ref, m, np.arange(3, 15, dtype=np.int64), steps=6)
        assert c.stats.units_read > len(c.slots)  # experts were evicted and read again
    finally:
        m.close()
