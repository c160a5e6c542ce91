"""The streamer and models under a memory budget: same tokens, RSS under the budget, clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_MODELS, TINY
from edgert.offload.memory import release_library_pages
from edgert.offload.stream import ALIGN, ExpertCache, RowReader, Streamer, layout
from edgert.offload.units import ByteRange, Unit, units
from edgert.quant.formats import QType
from edgert.quant.pack import HAVE_VNNI

import edgert
from edgert import hub, jit, loader, models
from edgert.errors import BudgetError, FormatError
from edgert.weights import TensorRef, WeightStore

# ---- the ring of slots, on a synthetic file ----------------------------------------------


def _file(tmp_path: Path, n: int = 3 << 20) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    return path, data


def _units(path: Path, spans: list[list[tuple[int, int]]]) -> list[Unit]:
    return [
        Unit(f"u{i}", "ffn", i, None, tuple(ByteRange(path, o, n) for o, n in rs), sum(n for _, n in rs), ())
        for i, rs in enumerate(spans)
    ]


SPANS = [[(10, 5000)], [(6000, 300_000), (400_000, 77)], [(1 << 20, 1 << 20)], [((3 << 20) - 999, 999)]]


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
@pytest.mark.parametrize("window", [1, 2, 3])
def test_streamer_ring(tmp_path, window, direct):
    """Units come back with their file bytes through every wrap of the ring, and a consumer
    that skips units (a forward that stopped early) still gets the unit it asks for."""
    path, data = _file(tmp_path)
    s = Streamer(_units(path, SPANS), window, direct=direct)
    try:
        order = [0, 1, 2, 3] * 3 + [2, 3, 1, 0, 3]  # wraps, then skips forward
        for u in order:
            slot = s.acquire(f"u{u}")
            lay = s.layouts[u]
            for (off, n), r in zip(SPANS[u], lay.reads, strict=True):
                got = s.slots[slot][lay.position(off) : lay.position(off) + n]
                assert np.array_equal(got, data[off : off + n]), (u, slot)
                assert r.offset % ALIGN == 0 and r.nbytes % ALIGN == 0 and r.pos % ALIGN == 0
        assert s.stats.bytes_read >= sum(n for u in order for _, n in SPANS[u])
    finally:
        s.close()


def test_streamer_reports_truncation(tmp_path):
    path, _ = _file(tmp_path)
    units = _units(path, [[(0, 4096)], [((3 << 20) - 5000, 5000)]])
    s = Streamer(units, 1, direct=False)
    try:
        s.acquire("u0")
        os.truncate(path, 1 << 20)  # the file shrinks under the running model
        with pytest.raises(FormatError, match="truncated or changed since it was loaded"):
            s.acquire("u1")
    finally:
        s.close()


def test_streamer_overlaps_reads_with_compute(tmp_path):
    """While compute holds one unit, the reader fills the next slot: a consumer that works
    longer than a read never waits after the first unit."""
    path, _ = _file(tmp_path)
    units = _units(path, [[(i << 19, 1 << 19)] for i in range(6)])
    s = Streamer(units, 2, direct=False)
    try:
        s.acquire("u0")
        for i in range(1, 6):
            done = threading.Event()
            done.wait(0.05)  # "compute" on the held unit
            waited = s.stats.wait_seconds
            s.acquire(f"u{i}")
            assert s.stats.wait_seconds - waited < 0.02
    finally:
        s.close()


def test_read_seconds_include_the_read_in_flight(tmp_path, monkeypatch):
    """A snapshot counts the busy period in progress: with a read always in flight (a disk-bound
    run), the reader's time would otherwise not grow for a whole token, and its rate would
    read as infinite."""
    from edgert.offload import stream

    path, _ = _file(tmp_path)
    started, release = threading.Event(), threading.Event()
    fill = stream.UnitReader.fill

    def slow_fill(self, lay, slot):
        started.set()
        release.wait(5)
        return fill(self, lay, slot)

    monkeypatch.setattr(stream.UnitReader, "fill", slow_fill)
    s = Streamer(_units(path, SPANS), 2, direct=False)
    try:
        assert started.wait(5)  # a read is in flight from here on
        t0 = time.perf_counter()
        threading.Event().wait(0.1)
        assert s.stats.read_seconds == 0.0  # nothing has landed yet
        assert s.snapshot().read_seconds >= time.perf_counter() - t0 - 0.01 >= 0.09
        release.set()
        s.acquire("u0")  # the readers go on to the next units: the disk may never go idle
        assert s.snapshot().read_seconds > 0.09 and s.snapshot().bytes_read > 0
    finally:
        release.set()
        s.close()


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_expert_cache(tmp_path, direct):
    """Experts come back with their bytes; wanted ones are read ahead, present ones are hits,
    the least recently used is evicted, and two slots make progress through any want list."""
    path, data = _file(tmp_path)
    spans = [[(i * 300_000 + 7, 100_000 + 1000 * i)] for i in range(8)]
    c = ExpertCache(_units(path, spans), 2, direct=direct)

    def check(i: int) -> None:
        slot = c.get(f"u{i}")
        (off, n), lay = spans[i][0], c.layouts[f"u{i}"]
        assert np.array_equal(c.slots[slot][lay.position(off) : lay.position(off) + n], data[off : off + n])

    try:
        c.want(["u0", "u1", "u2", "u3"])  # more than the slots: read as slots free up
        for i in range(4):
            check(i)
        assert c.stats.units_read == 4
        hits = c.hits
        c.want(["u3", "u2"])  # the last two are still in their slots
        check(3)
        check(2)
        assert c.hits == hits + 2 and c.stats.units_read == 4
        check(5)  # not wanted: read on demand, evicting the least recently used (u3)
        check(2)
        assert c.hits == hits + 3
        check(3)  # it was evicted: read again
        assert c.stats.units_read == 6
        assert c.stats.bytes_read == sum(r.need for i in (0, 1, 2, 3, 5, 3) for r in c.layouts[f"u{i}"].reads)
    finally:
        c.close()


def test_layout_and_row_reader(tmp_path):
    path, data = _file(tmp_path)
    (u,) = _units(path, [[(5, 10), (9000, 10)]])
    lay = layout(u)
    assert [r.offset for r in lay.reads] == [0, 8192] and lay.size == 2 * ALIGN
    rr = RowReader(TensorRef("t", path, 100, 68 * 1000, QType.Q8_0, (1000, 64)), 4)  # 68 bytes a row
    try:
        rows = rr.read(np.array([7, 0, 999]))
        for j, i in enumerate([7, 0, 999]):
            assert np.array_equal(rows[j], data[100 + 68 * i : 100 + 68 * (i + 1)])
    finally:
        rr.close()


# ---- real models under a budget ------------------------------------------------------------

PROMPT = "The capital of France is"
CTX = 256


def budget_for(path: Path, share: float = 0.4) -> int:
    """`share` of the model's bytes plus the runtime's own overhead, as `edgert plan` reports
    it from a fresh process: interpreter, tokenizer and kernels, the KV cache for the
    context, the workspace, the norms."""
    r = subprocess.run(
        [sys.executable, "-m", "edgert.apps.cli", "plan", str(path), "-m", "1TiB", "-c", str(CTX), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    p = json.loads(r.stdout)
    src = loader.open_source(path)
    norms = sum(u.nbytes for u in units(src.store, src.args) if u.kind == "norms")
    return int(share * path.stat().st_size) + p["overhead"] + p["kv"] + p["workspace"] + norms


# The child is started by a small launcher process: a forked child's ru_maxrss starts from its
# parent's resident set at fork, and pytest's grows to a GiB over the suite.
_LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[0] + ".rss", "w").write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run(path: Path, tmp_path: Path, *extra: str, env=None) -> tuple[subprocess.CompletedProcess, int]:
    """`edgert run` in a child process; returns it and its peak RSS as the kernel measured it
    (wait4's rusage of that child and the children it waited for)."""
    cli = [sys.executable, "-m", "edgert.apps.cli"]
    cmd = [*cli, "run", str(path), "-p", PROMPT, "-n", "24", "-c", str(CTX)]
    launcher = tmp_path / "launch.py"
    launcher.write_text(_LAUNCH)
    argv = [sys.executable, str(launcher), *cmd, *extra]
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    rss = int(Path(str(launcher) + ".rss").read_text())
    return subprocess.CompletedProcess(cmd, r.returncode, r.stdout, r.stderr), rss


def _load_in_process(path: Path, **kw):
    """The model under a budget of 40% of its bytes plus the overhead this process measures
    for itself (pytest holds far more than a fresh process)."""
    src = loader.open_source(path)
    p = loader.make_plan(src, 1 << 40, CTX)
    norms = sum(u.nbytes for u in units(src.store, src.args) if u.kind == "norms")
    budget = int(0.4 * path.stat().st_size) + p.overhead.bytes + p.kv.bytes + p.workspace.bytes + norms
    return edgert.LLM(src, context=CTX, memory_budget=budget + (16 << 20), **kw)


@pytest.mark.parametrize("name", REAL_MODELS)
def test_budget_gives_the_same_tokens_under_the_budget(real_model, name, tmp_path):
    path = real_model(name)
    free, _ = _run(path, tmp_path)
    assert free.returncode == 0, free.stderr
    # Compiling the kernels is the install's one-time step, in processes of its own (a
    # budgeted run would do it first too). The run measured here loads them: numba logs each
    # kernel it compiles and saves, and there must be none.
    jit.ensure_compiled(hub.default_cache_dir())
    # Where pytest maps LLVM's pages too, a child cannot hand them back (madvise PAGEOUT skips
    # shared pages) and measures a larger share; a user's process has no such neighbour.
    release_library_pages()
    budget = budget_for(path)
    release_library_pages()
    env = {**os.environ, "NUMBA_DEBUG_CACHE": "1"}
    bud, rss = _run(path, tmp_path, "--memory-budget", str(budget), env=env)
    assert bud.returncode == 0, bud.stderr
    assert "streaming, per decoded token" in bud.stderr  # it did stream
    log = re.findall(r"\[cache\] [^\n]*\n", bud.stdout)  # between the text's pieces too
    assert log and not [line for line in log if "saved" in line], log  # loaded, never compiled
    text = re.sub(r"\[cache\] [^\n]*\n", "", bud.stdout)
    assert text == free.stdout, (name, free.stdout, text)
    assert rss <= budget, f"{name}: peak RSS {rss / 2**20:.1f} MiB over the budget {budget / 2**20:.1f} MiB"


def test_budget_below_minimum_is_refused_with_the_minimum(real_model, tmp_path):
    path = real_model("smollm2-135m")
    r, _ = _run(path, tmp_path, "--memory-budget", "50MiB")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "below this model's minimum working set" in r.stderr and "--memory-budget" in r.stderr
    with pytest.raises(BudgetError, match=r"minimum working set of \d+ MiB"):
        edgert.load(path, context=CTX, memory_budget="50MiB")


@pytest.mark.parametrize("packed", [False, True], ids=["model-file", "packed-file"])
def test_truncated_after_load_fails_clearly(real_model, tmp_path, packed):
    """The file the streamer reads (the model's, or the packed stream file) shrinks under it."""
    path = tmp_path / "model.gguf"
    shutil.copy(real_model("smollm2-135m"), path)
    with _load_in_process(path, cache_dir=tmp_path, pack_stream=packed) as llm:
        assert llm.model.streamer is not None
        assert (llm.model.stream_file is not None) == (packed and HAVE_VNNI)
        llm.generate(PROMPT, max_tokens=2)
        read = llm.model.stream_file.path if llm.model.stream_file else path
        os.truncate(read, read.stat().st_size // 2)
        with pytest.raises(FormatError, match="truncated or changed since it was loaded"):
            llm.generate(" and the capital of Spain is", max_tokens=4)


def test_prompt_streams_each_unit_once_per_chunk(real_model):
    """A prompt of two chunks reads every streamed unit twice, not once per token; the
    statistics report what was read and waited for."""
    path = real_model("smollm2-135m")
    with _load_in_process(path, max_tokens=64) as llm:
        s = llm.model.streamer
        n = len(s.layouts)
        llm.generate(list(range(1, 101)), max_tokens=3)  # 100 prompt tokens: 2 chunks, then 2 steps
        assert 4 * n <= s.stats.units_read <= 4 * n + s.window
        st = llm.stats
        assert st.streamed and st.prompt_bytes_read >= 2 * sum(lay.size for lay in s.layouts) * 0.9
        assert (
            st.bytes_read > 0 and st.per_token()["bytes_read"] > 0.9 * llm.model.plan.streamed_per_token.bytes
        )


# ---- MoE experts through the expert cache ----------------------------------------------------


def _moe_plan(src, ctx: int, everything: bool):
    """The minimum budget's plan (everything streams: the ring and the expert cache), or the
    smallest budget whose plan keeps every dense unit and streams experts through a cache too
    small to hold all of them, so that they are evicted and read again."""
    from edgert.offload.memory import Memory
    from edgert.offload.plan import plan_model
    from edgert.offload.profile import default_profile

    prof, _ = default_profile(None)
    a, zero = src.args, Memory(0)
    lo = plan_model(src.store, a, Memory(1 << 40), ctx, prof, overhead=zero).minimum.bytes
    if everything:
        return plan_model(src.store, a, Memory(lo), ctx, prof, overhead=zero)
    for budget in range(lo, lo + 4 * src.store.nbytes(), 512):
        p = plan_model(src.store, a, Memory(budget), ctx, prof, overhead=zero)
        kinds = {u.name: u.kind for u in units(src.store, a)}
        if p.streamed and {kinds[n] for n in p.streamed} == {"expert"} and p.expert_slots < len(p.streamed):
            return p
    raise AssertionError("no budget streams only experts")


@pytest.mark.parametrize("everything", [False, True], ids=["experts", "everything"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_experts_stream_through_the_cache(arch, everything):
    """Experts read into the LRU expert cache as the router picks them (with the dense blocks
    resident, or streaming through the ring): the same logits as the resident model, through
    a prompt and decode steps."""
    ctx = 64
    src = loader.open_source(TINY / arch)
    p = _moe_plan(src, ctx, everything)
    mod = models.module_for(src.args.arch)
    ref = mod.Model(src.args, loader.open_source(TINY / arch).store, ctx)
    m = mod.Model(src.args, src.store, ctx, plan=p)
    try:
        assert (m.streamer is not None) == everything and m.expert_cache is not None
        tokens = np.arange(3, 15, dtype=np.int64)
        caches = ref.make_cache(), m.make_cache()
        want, got = ref(tokens, caches[0], 0, all_logits=True), m(tokens, caches[1], 0, all_logits=True)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        pos = len(tokens)
        for _ in range(6):
            tok = np.array([int(want[-1].argmax())])
            assert int(got[-1].argmax()) == tok[0]
            want, got = ref(tok, caches[0], pos), m(tok, caches[1], pos)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            pos += 1
        c = m.expert_cache
        assert c.stats.units_read > len(c.slots) and c.stats.bytes_read > 0  # evicted and read again
        ring = m.streamer.stats.bytes_read if everything else 0
        assert m.io_stats().bytes_read == c.stats.bytes_read + ring
    finally:
        m.close()


def _mapped_kib(path: Path) -> int:
    """This process's resident pages of its mappings of `path`."""
    kib, on = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                on = line.rstrip().endswith(str(path))
            elif on and line.startswith("Rss:"):
                kib += int(line.split()[1])
    return kib


def test_loading_leaves_no_file_pages_mapped(tmp_path):
    """What the store reads and copies leaves none of the file mapped: not its own pages, nor
    the large folio around them that Linux (6.18 on ext4) maps whole on a fault. A model's
    norms lie between its matrices, and their neighbours' pages added up to 50 MiB of a
    load's peak."""
    path = tmp_path / "weights.bin"
    rng = np.random.default_rng(0)
    path.write_bytes(rng.standard_normal(4 << 20, dtype=np.float32).tobytes())  # 16 MiB
    path.read_bytes()  # in the page cache, read sequentially: in large folios where the FS has them
    store = WeightStore({})
    norm = TensorRef("norm", path, (7 << 20) + 4096, 4 * 576, QType.F32, (576,))
    matrix = TensorRef("matrix", path, (9 << 20) + 4096, 4 * 576 * 1000, QType.F32, (1000, 576))
    got = store.f32(norm)
    np.testing.assert_array_equal(got, np.fromfile(path, np.float32, 576, offset=norm.offset))
    assert _mapped_kib(path) == 0
    rows = store.raw(matrix)
    assert rows.sum(dtype=np.float64) != 0  # read every page
    store.evict(matrix)
    assert _mapped_kib(path) == 0
