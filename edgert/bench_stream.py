"""`edgert bench MODEL --memory-budget B ...`: decode speed under a memory limit, edgert
streaming beside llama.cpp (mmap), each run inside a memory cgroup whose limit equals the
budget, so that the page cache counts against it as it would on a device with that much
RAM. Before each run the page cache is dropped. The disk limit (bytes edgert streams per
token / cold read bandwidth) is measured in the same run, once per round before either
system runs, by reading the whole model file with O_DIRECT requests as the streamer makes
them (the better of one and two in flight). With `repeat` > 1 the two systems alternate,
round after round (which goes first alternates too), and the table gives medians with their
range: a virtual disk's speed and llama.cpp's drift by 10% between runs.

Decode speed is the steady rate: each system decodes WARMUP_TOKENS untimed tokens after the
prompt before the timed ones, as llama-bench warms up before it measures. edgert's first
decode step loads the single-token kernels from numba's cache (0.13 s on Qwen2.5-0.5B, 0.24 s
under a budget, where the streamed units' kernels load too), which in an 8-token measurement
of a 10 tok/s model would pass for a 25% slower decode.

Needs root and a writable memory cgroup hierarchy (v1 or v2) and /proc/sys/vm/drop_caches;
without them it refuses with the reason, since a number measured without the limit would
not mean what the table says.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = "edgert-bench-stream/3"  # /2: runs repeat (StreamRun.round); /3: a warm-up token
WARMUP_TOKENS = 1  # decoded before the timed tokens, by both systems
V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


def _bench_error(msg: str) -> Exception:
    from edgert.bench import BenchError  # (this file also runs by path where edgert is absent)

    return BenchError(msg)


class MemoryCgroup:
    """A fresh memory cgroup with `limit` bytes; `preexec` puts a child process into it."""

    def __init__(self, limit: int, name: str | None = None):
        self.limit = limit
        name = name or f"edgert-bench-{os.getpid()}"
        if (V1 / "memory.limit_in_bytes").exists():
            self.version, self.path = 1, V1 / name
        elif (V2 / "cgroup.controllers").exists() and "memory" in (V2 / "cgroup.controllers").read_text():
            self.version, self.path = 2, V2 / name
        else:
            raise _bench_error(
                "no memory cgroup hierarchy (cgroup v1 memory or v2 with the memory controller)"
            )
        try:
            self.path.mkdir(exist_ok=True)
            if self.version == 1:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                swap = self.path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(limit))  # no escape into swap either
            else:
                (self.path / "memory.max").write_text(str(limit))
                (self.path / "memory.swap.max").write_text("0")
        except OSError as e:
            raise _bench_error(
                f"cannot make a memory cgroup at {self.path} ({e.strerror}); run as root"
            ) from None

    def preexec(self) -> None:
        """In the child, before exec: join the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        """The cgroup's high-water mark: process memory and its page cache."""
        f = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / f).read_text())
        except (OSError, ValueError):
            return -1

    def oom_kills(self) -> int:
        f = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.path / f).read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise _bench_error(f"cannot drop the page cache ({e.strerror}); run as root") from None


def cold_read_bandwidth(
    path: Path, chunk: int = 64 << 20, direct: bool = True, limit: int = 1 << 62, inflight: int = 1
) -> tuple[float, int]:
    """Bytes per second reading the file (up to `limit` bytes) in `chunk` requests, O_DIRECT
    or through the page cache, after dropping the page cache; `inflight` threads keep that
    many requests in flight (each takes every inflight-th chunk), as the streamer's readers do."""
    import threading

    from edgert.offload.stream import aligned_empty

    drop_caches()
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    size = min(limit, path.stat().st_size)
    done = [0] * inflight

    def read(i: int) -> None:
        buf, fd = aligned_empty(chunk), os.open(path, flags)
        try:
            for off in range(i * chunk, size, inflight * chunk):
                done[i] += os.preadv(fd, [memoryview(buf)], off)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(inflight)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(done) / (time.perf_counter() - t), sum(done)


def disk_bandwidth(path: Path) -> float:
    """The disk's cold O_DIRECT read bandwidth over the whole file: the better of one request
    in flight and the streamer's READERS."""
    from edgert.offload.stream import READERS

    return max(cold_read_bandwidth(path, inflight=n)[0] for n in sorted({1, READERS}))


@dataclass
class StreamRun:
    system: str
    budget: int
    decode_tps: float
    tokens: int  # decoded
    seconds: float
    peak_rss: int  # the process's own high-water mark (-1 if it was killed)
    cgroup_peak: int  # process + page cache, as the cgroup counted it
    oom_kills: int
    bytes_per_token: float = 0.0  # edgert: streamed from disk per decode step
    io_wait_per_token: float = 0.0
    compute_per_token: float = 0.0
    reader_bps: float = 0.0  # edgert's readers: bytes / seconds with a read in flight
    disk_bps: float = 0.0  # cold read bandwidth measured just before this run (edgert's runs)
    plan: dict = field(default_factory=dict)
    error: str = ""
    round: int = 0  # which repetition (0-based); a round runs each system once


@dataclass
class StreamBench:
    model: str
    model_bytes: int
    ctx: int
    threads: int
    disk_bps: float  # O_DIRECT, the streamer's path: the best of every measurement in the run
    buffered_bps: float  # through the page cache, for comparison
    runs: list[StreamRun]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}

    def disk_limit_tps(self, run: StreamRun) -> float:
        """Bytes streamed per token ÷ the disk's bandwidth as measured right before the run (a
        virtual disk's speed drifts through a benchmark: 1.3-1.8 GB/s here)."""
        bps = run.disk_bps or self.disk_bps
        return bps / run.bytes_per_token if run.bytes_per_token > 0 else 0.0


def run_stream_bench(
    model: str,
    budgets: Sequence[int],
    threads: int,
    ctx: int = 512,
    decode_tokens: int = 8,
    llama_python: str | None = None,
    vs_llama: bool = True,
    timeout_s: float = 600.0,
    progress: Callable[[str], None] | None = None,
    repeat: int = 1,
) -> StreamBench:
    """For each budget, `repeat` rounds of edgert with that budget and llama.cpp (mmap), in
    alternating order, each in a fresh cgroup limited to the budget, the page cache dropped
    before each.

    Raises:
        BenchError: no cgroup or drop_caches (not root), or llama.cpp is missing.
    """
    from edgert import hub, jit, loader
    from edgert.bench import find_llama_python, prompt_ids
    from edgert.offload.memory import release_library_pages

    say = progress or (lambda _m: None)
    path = loader.resolve(model)
    src = loader.open_source(path)
    py = find_llama_python(llama_python) if vs_llama else None
    MemoryCgroup(1 << 40, f"edgert-bench-probe-{os.getpid()}").remove()  # refuse early, clearly
    # here, not in the first run's cgroup (compiling takes more memory than the run)
    jit.ensure_compiled(hub.default_cache_dir(), lambda what, done, total: done == total and say(what))
    # A page of a library that this process maps too is one that a worker cannot hand back
    # (madvise PAGEOUT skips shared pages), so its budget would pay for this process's import.
    release_library_pages()
    drop_caches()
    ids = prompt_ids(src.tokenizer, 8)
    spec = dict(model=str(path.resolve()), ctx=ctx, threads=threads, prompt=ids, decode_tokens=decode_tokens)
    say("cold read bandwidth: buffered (first GiB), then O_DIRECT (whole file, 1 and 2 reads in flight)")
    buffered_bps, _ = cold_read_bandwidth(path, direct=False, limit=1 << 30)
    disk_bps = disk_bandwidth(path)
    runs = []
    systems = [("edgert", sys.executable)] + ([("llama.cpp", py)] if py else [])
    turn = 0  # which system goes first alternates over every round of every budget
    for b in budgets:
        for rnd in range(repeat):
            of = f", round {rnd + 1} of {repeat}" if repeat > 1 else ""
            # once per round, before either system: the whole-file read may leave the model
            # file in a virtual disk's host cache, and llama.cpp maps that file
            say(f"cold read bandwidth before the runs at {b / 2**30:.2f} GiB{of}")
            bps = disk_bandwidth(path)
            disk_bps = max(disk_bps, bps)
            for name, python in systems[:: -1 if turn % 2 else 1]:
                say(f"{name} at {b / 2**30:.2f} GiB{of}")
                run = _run_in_cgroup(python, {**spec, "system": name, "budget": b}, b, timeout_s)
                run.disk_bps = bps if name == "edgert" else 0.0
                run.round = rnd
                runs.append(run)
            turn += 1
    # A virtual disk's backing store caches too, so "cold" varies over a run: the limit is the
    # best of the whole-file reads before the runs and after.
    say("cold read bandwidth again (O_DIRECT, whole file)")
    disk_bps = max(disk_bps, disk_bandwidth(path))
    return StreamBench(str(path), path.stat().st_size, ctx, threads, disk_bps, buffered_bps, runs)


def _run_in_cgroup(python: str, spec: dict, budget: int, timeout_s: float) -> StreamRun:
    from edgert.workers import WorkerError, run_worker, worker_command

    cg = MemoryCgroup(budget)
    drop_caches()
    if spec["system"] == "edgert":
        cmd = worker_command(python, module="edgert.bench_stream")
    else:
        cmd = worker_command(python, __file__)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    t = time.monotonic()
    try:
        out = run_worker(cmd, spec, timeout_s, env=env, preexec_fn=cg.preexec)
        return StreamRun(**out, cgroup_peak=cg.peak(), oom_kills=cg.oom_kills())
    except WorkerError as e:
        err = str(e)
    finally:
        peak, kills = cg.peak(), cg.oom_kills()
        cg.remove()
    return StreamRun(spec["system"], budget, 0.0, 0, time.monotonic() - t, -1, peak, kills, error=err[:300])


# ---- workers: one process each, inside the cgroup; the last stdout line is the JSON -------


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _edgert_worker(spec: dict) -> dict:
    import edgert
    from edgert.generate import generate_step
    from edgert.sample import make_sampler

    llm = edgert.load(
        spec["model"], context=spec["ctx"], threads=spec["threads"], memory_budget=spec["budget"]
    )
    n_steps = spec["decode_tokens"] + WARMUP_TOKENS + 1
    steps = generate_step(llm.session, spec["prompt"], make_sampler(), n_steps)
    next(steps)  # the prompt
    for _ in range(WARMUP_TOKENS):
        next(steps)
    st = llm.stats
    bytes0, wait0, read0 = st.bytes_read, st.io_wait_seconds, st.read_seconds
    t = time.monotonic()
    n = sum(1 for _ in steps)
    dt = time.monotonic() - t
    read_bytes, wait, read_s = st.bytes_read - bytes0, st.io_wait_seconds - wait0, st.read_seconds - read0
    return dict(
        system="edgert",
        budget=spec["budget"],
        decode_tps=n / dt,
        tokens=n,
        seconds=dt,
        peak_rss=_peak_rss(),
        bytes_per_token=read_bytes / n,
        io_wait_per_token=wait / n,
        compute_per_token=(dt - wait) / n,
        reader_bps=read_bytes / read_s if read_s > 0 else 0.0,
        plan={k: v for k, v in llm.model.plan.to_dict().items() if k not in ("pinned", "streamed")},
    )


def _llama_worker(spec: dict) -> dict:
    import llama_cpp

    sys.path.insert(0, str(Path(__file__).parent))
    from bench import no_extra_buffer_types  # this file runs by path, in an env without edgert

    no_extra_buffer_types(llama_cpp)
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=spec["ctx"],
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        use_mmap=True,
        seed=0,
        verbose=False,
    )
    llm.eval(spec["prompt"])
    tok = 0
    for _ in range(WARMUP_TOKENS):
        llm.eval([tok])
    t = time.monotonic()
    for _ in range(spec["decode_tokens"]):
        llm.eval([tok])  # the token id does not change the work
    dt = time.monotonic() - t
    return dict(
        system="llama.cpp",
        budget=spec["budget"],
        decode_tps=spec["decode_tokens"] / dt,
        tokens=spec["decode_tokens"],
        seconds=dt,
        peak_rss=_peak_rss(),
    )


def format_stream_table(res: StreamBench) -> str:
    """The benchmark as a Markdown table, one row per budget. With several rounds a figure is
    the median of the runs that finished, with their range in brackets; the ratio to
    llama.cpp is that of the two systems' medians over the rounds where both finished (so it
    lies within the rounds' own ratios, which give its range). The readers' cell is the
    median run's (the lower of the middle two for an even count). Peak memory is the highest
    of the runs that reported one, OOM kills their sum: the budget must hold in every run."""
    from edgert.bench import LLAMA_NOTE

    by: dict[int, dict[str, list[StreamRun]]] = {}
    for r in res.runs:
        by.setdefault(r.budget, {}).setdefault(r.system, []).append(r)
    rounds = max((r.round for r in res.runs), default=0) + 1
    timed = max((r.tokens for r in res.runs), default=0)
    lines = [
        f"model {Path(res.model).name} ({res.model_bytes / 2**30:.2f} GiB), ctx {res.ctx}, "
        f"{res.threads} threads; cold read bandwidth with O_DIRECT (whole file, the better of 1 and 2 "
        f"reads in flight) {_gbs(res)}; buffered {res.buffered_bps / 1e9:.2f} GB/s (first GiB)"
        + (f"; {rounds} rounds per budget, medians (range)" if rounds > 1 else "")
        + f"; decode: {timed} tokens timed after {WARMUP_TOKENS} untimed",
        "",
        "| budget | edgert tok/s | llama.cpp tok/s | edgert / llama.cpp | streamed per token | "
        "disk read before the run | disk limit tok/s | edgert / disk limit | edgert's reads (busy) | "
        "I/O wait per token | edgert peak RSS | cgroup peak | OOM kills |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, s in sorted(by.items()):
        es, ls = s.get("edgert", []), s.get("llama.cpp", [])
        eok, lok = [r for r in es if not r.error], [r for r in ls if not r.error]
        mid = sorted(eok, key=lambda r: r.decode_tps)[(len(eok) - 1) // 2] if eok else None
        pairs = [(e, ll) for e in eok for ll in lok if e.round == ll.round and ll.decode_tps]
        each = [e.decode_tps / ll.decode_tps for e, ll in pairs]
        e_tps, l_tps = _median([e.decode_tps for e, _ in pairs]), _median([ll.decode_tps for _, ll in pairs])
        ratio = _fig(each, "{:.2f}×", e_tps / l_tps) if pairs else "–"
        peaks = [r.peak_rss for r in es if r.peak_rss >= 0]
        limits = [res.disk_limit_tps(r) for r in eok]
        cells = [
            f"{b / 2**30:.2f} GiB",
            _tps(es),
            _tps(ls),
            ratio,
            _fig([r.bytes_per_token / 2**20 for r in eok], "{:.0f} MiB"),
            _fig([(r.disk_bps or res.disk_bps) / 1e9 for r in eok], "{:.2f} GB/s"),
            _fig(limits, "{:.3f}"),
            _fig([r.decode_tps / lim for r, lim in zip(eok, limits, strict=True) if lim], "{:.0%}"),
            _reads(mid) if mid else "–",
            _fig([r.io_wait_per_token * 1000 for r in eok], "{:.0f} ms"),
            f"{max(peaks) / 2**20:.0f} MiB" if peaks else "–",
            f"{max(r.cgroup_peak for r in es) / 2**20:.0f} MiB" if es else "–",
            f"{sum(r.oom_kills for r in es)} / {sum(r.oom_kills for r in ls) if ls else '–'}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"llama.cpp: use_mmap=True; {LLAMA_NOTE}")
    return "\n".join(lines)


def _median(xs: list[float]) -> float | None:
    import statistics

    return statistics.median(xs) if xs else None


def _fig(xs: list[float], fmt: str, value: float | None = None) -> str:
    """`value` (default: the median of xs) in `fmt`, with the range of xs where it has one."""
    value = _median(xs) if value is None else value
    if value is None:
        return "–"
    lo, hi = fmt.format(min(xs, default=value)), fmt.format(max(xs, default=value))
    return fmt.format(value) if lo == hi else f"{fmt.format(value)} ({lo}–{hi})"


def _tps(runs: list[StreamRun]) -> str:
    """A system's decode tok/s: the median of its finished runs, or why none finished."""
    if not runs:
        return "–"
    ok = [r.decode_tps for r in runs if not r.error]
    failed = [r for r in runs if r.error]
    if not ok:
        return f"failed: {failed[0].error[:60]}"
    cell = _fig(ok, "{:.3f}")
    return cell + (f", {len(failed)} of {len(runs)} failed: {failed[0].error[:60]}" if failed else "")


def _reads(run: StreamRun) -> str:
    """The rate edgert's readers moved bytes at while a read was in flight, and the share of
    the decode they kept one in flight: what separates the streamer's scheduling (the share)
    from the disk's own speed under the run's load (the rate)."""
    if not run.reader_bps or not run.decode_tps:
        return "–"
    busy = run.bytes_per_token * run.decode_tps / run.reader_bps
    return f"{run.reader_bps / 1e9:.2f} GB/s ({min(busy, 1.0):.0%})"


def _gbs(res: StreamBench) -> str:
    each = [r.disk_bps for r in res.runs if r.disk_bps]
    lo, hi = min(each, default=res.disk_bps), max(each, default=res.disk_bps)
    return f"{lo / 1e9:.2f}-{hi / 1e9:.2f} GB/s over the run" if hi > lo else f"{hi / 1e9:.2f} GB/s"


if __name__ == "__main__":
    spec = json.loads(sys.argv[-1])
    worker = _edgert_worker if spec["system"] == "edgert" else _llama_worker
    try:
        print(json.dumps(worker(spec)))
    except Exception as e:  # one line for the table: a budget below the minimum, a failed load
        sys.exit(f"{type(e).__name__}: {e}")
