"""Benchmarks: edgert alone, or against llama.cpp on the same model, prompt, threads and context.

Every measurement runs in a fresh process (`python -m edgert.bench worker SPEC`), so load time,
cold start and peak RSS belong to that run alone and the two systems never share a process.
llama.cpp runs under whichever Python has llama-cpp-python; this file is then run by path, so
its top level imports only the standard library (numpy and edgert are imported inside workers).

A warm-up run per system (not recorded) fills the numba compile cache and the page cache;
then one run loads the model, decodes greedily after a short prompt (its first token gives the cold
start: process start to first token), then times a prefill of each prompt size from an empty
cache, and reports its own peak RSS. The systems alternate, in reversed order every other round.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = "edgert-bench/1"
TEXT = (
    "The history of computing is longer than the history of computing hardware and modern computing "
    "technology and includes the history of methods intended for pen and paper or for chalk and slate, "
    "with or without the aid of tables. Digital computing is intimately tied to the representation of "
    "numbers. But long before abstractions like the number arose, there were mathematical concepts to "
    "serve the purposes of civilization. "
)
DECODE_PROMPT = 8  # tokens before the greedy decode
# llama.cpp's repacked ("extra") weight buffers use AMX tiles on CPUs that report AMX; sandboxes
# that do not grant the tile state kill the process with SIGILL, so both sides use plain layouts.
LLAMA_NOTE = "use_extra_bufts=False (repacked AMX weight buffers SIGILL in this sandbox)"

EDGERT, LLAMA, LLAMA_NOMMAP = "edgert", "llama.cpp", "llama.cpp no-mmap"


class BenchError(Exception):
    """A benchmark could not run; the message says why and what to do."""


@dataclass(frozen=True)
class BenchConfig:
    model: str
    threads: int
    ctx: int = 4096
    repeat: int = 3
    prompt_sizes: tuple[int, ...] = (128, 512)
    decode_tokens: int = 128
    vs_llama: bool = False
    llama_python: str | None = None  # default: this interpreter, if it has llama_cpp
    llama_mmap: bool = True
    membw_mib: int = 1024  # array streamed by the bandwidth probe
    cache_dir: Path | None = None  # where named models are pulled
    kv_bits: int = 16  # edgert's KV cache (llama.cpp keeps its default f16 cache)
    timeout_s: float = 1800.0  # per run


@dataclass
class Run:
    """One process of one system."""

    system: str
    load_s: float
    cold_start_s: float  # process start to first generated token
    decode_tps: float
    prompt_tps: dict[str, float]  # prompt size -> tok/s
    peak_rss: int  # bytes
    threads: int
    tokens: list[int] = field(repr=False, default_factory=list)  # the greedy decode


@dataclass
class Summary:
    median: float
    min: float
    max: float

    @property
    def spread_pct(self) -> float:
        return 100 * (self.max - self.min) / self.median if self.median else 0.0


@dataclass
class SystemResult:
    name: str
    settings: dict
    runs: list[Run]
    stats: dict[str, Summary]  # metric -> summary over runs


@dataclass
class BenchResult:
    model: str
    arch: str
    model_bytes: int
    weights_per_token: int  # bytes of weights one decoded token reads
    settings: dict
    machine: dict
    systems: dict[str, SystemResult]
    ratios: dict[str, float]  # edgert / llama.cpp

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, s in self.systems.items():
            for k, v in s.stats.items():
                d["systems"][name]["stats"][k]["spread_pct"] = v.spread_pct
        return {"schema": SCHEMA, **d}


def metrics(run: Run) -> dict[str, float]:
    out = {"load_s": run.load_s, "cold_start_s": run.cold_start_s, "decode_tps": run.decode_tps}
    out.update({f"prompt{n}_tps": v for n, v in run.prompt_tps.items()})
    out["peak_rss"] = float(run.peak_rss)
    return out


def summarize(runs: Sequence[Run]) -> dict[str, Summary]:
    per = [metrics(r) for r in runs]
    return {
        k: Summary(statistics.median(m[k] for m in per), min(m[k] for m in per), max(m[k] for m in per))
        for k in per[0]
    }


def weights_per_token(store) -> int:
    """Weight bytes a decode step reads: every matrix once, but of the embedding one row, unless
    the output head is tied to it (then all of it)."""
    emb = store.refs.get("token_embd.weight")
    total = store.nbytes()
    if emb is None or "output.weight" not in store:
        return total
    return total - emb.nbytes + emb.nbytes // emb.shape[0]


def prompt_ids(tokenizer, n: int) -> list[int]:
    """n deterministic ids: BOS (where the model adds one) then TEXT's tokens, repeated."""
    head = tokenizer.encode(TEXT)
    body = tokenizer.encode(TEXT, add_bos=False)
    ids = head[: len(head) - len(body)]
    while len(ids) < n:
        ids += body
    return ids[:n]


def find_llama_python(path: str | None) -> str:
    """An interpreter that imports llama_cpp, or BenchError."""
    py = path or sys.executable
    r = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True, text=True)
    if r.returncode != 0:
        where = f"--llama-python {py}" if path else f"this Python ({py})"
        raise BenchError(
            f"--vs llama.cpp needs llama-cpp-python, which {where} cannot import: "
            "install the benchmark extra (pip install 'edgert[bench]') or pass --llama-python PATH"
        )
    return py


def _spawn(python: str, spec: dict, timeout: float) -> dict:
    """Run one worker process; its result is the JSON on the last line of its stdout."""
    from edgert.workers import WorkerError, run_worker, worker_command

    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1))}
    if spec["system"] == EDGERT or spec["system"] == "membw":
        cmd = worker_command(python, module="edgert.bench") + ["worker"]
    else:  # an interpreter that may lack edgert: run this file by path
        cmd = worker_command(python, __file__) + ["worker"]
    try:
        return run_worker(cmd, {**spec, "t_spawn": time.monotonic()}, timeout, env=env)
    except WorkerError as e:
        raise BenchError(f"{spec['system']} run failed: {e}") from None


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Warm up each system once (compile cache, page cache), then `cfg.repeat` rounds of runs.

    Raises:
        BenchError: llama.cpp is missing, a prompt does not fit the context, or a run failed.
    """
    from edgert import loader

    say = progress or (lambda _msg: None)
    path = loader.resolve(cfg.model, cfg.cache_dir)
    src = loader.open_source(path)
    ctx = min(cfg.ctx, src.args.context_length or cfg.ctx)
    longest = max(max(cfg.prompt_sizes), DECODE_PROMPT + cfg.decode_tokens)
    if longest + 1 > ctx:
        raise BenchError(
            f"the context ({ctx}) is too short for a {longest}-token run; raise --ctx or use --quick"
        )
    ids = prompt_ids(src.tokenizer, max(max(cfg.prompt_sizes), DECODE_PROMPT))
    base = dict(
        model=str(path.resolve()),
        threads=cfg.threads,
        ctx=ctx,
        prompts={str(n): ids[:n] for n in cfg.prompt_sizes},
        decode_prompt=ids[:DECODE_PROMPT],
        decode_tokens=cfg.decode_tokens,
    )
    systems = {EDGERT: (sys.executable, {**base, "system": EDGERT, "kv_bits": cfg.kv_bits})}
    if cfg.vs_llama:
        py = find_llama_python(cfg.llama_python)
        systems[LLAMA] = (py, {**base, "system": LLAMA, "mmap": cfg.llama_mmap})
        # the RSS baseline: weights copied into process memory, no page cache shared
        systems[LLAMA_NOMMAP] = (py, {**base, "system": LLAMA_NOMMAP, "mmap": False})

    load_before = os.getloadavg()[0]
    for name, (py, spec) in systems.items():
        say(f"warm-up: {name}")
        _spawn(py, {**spec, "warmup": True}, cfg.timeout_s)  # to the first token only
    runs: dict[str, list[Run]] = {name: [] for name in systems}
    order = list(systems)
    for r in range(cfg.repeat):
        for name in order if r % 2 == 0 else order[::-1]:
            say(f"round {r + 1}/{cfg.repeat}: {name}")
            py, spec = systems[name]
            runs[name].append(Run(**_spawn(py, spec, cfg.timeout_s)))
    say("memory bandwidth probe")
    bw = _spawn(
        sys.executable, {"system": "membw", "threads": cfg.threads, "mib": cfg.membw_mib}, cfg.timeout_s
    )

    results = {}
    for name, rs in runs.items():
        settings = {"threads": cfg.threads, "ctx": ctx}
        if name == EDGERT:
            settings["kv_bits"] = cfg.kv_bits
        else:
            settings.update(n_batch=512, use_mmap=systems[name][1]["mmap"], note=LLAMA_NOTE)
        results[name] = SystemResult(name, settings, rs, summarize(rs))
    ratios = {}
    if cfg.vs_llama:
        e, ll, nm = (results[k].stats for k in (EDGERT, LLAMA, LLAMA_NOMMAP))
        for k in e:
            if k.endswith("_tps"):
                ratios[k] = e[k].median / ll[k].median if ll[k].median else 0.0
        ratios["load_s"] = e["load_s"].median / ll["load_s"].median
        ratios["cold_start_s"] = e["cold_start_s"].median / ll["cold_start_s"].median
        ratios["peak_rss_vs_no_mmap"] = e["peak_rss"].median / nm["peak_rss"].median
    return BenchResult(
        model=str(path),
        arch=src.args.arch,
        model_bytes=path.stat().st_size if path.is_file() else src.store.nbytes(),
        weights_per_token=weights_per_token(src.store),
        settings={
            "threads": cfg.threads,
            "ctx": ctx,
            "repeat": cfg.repeat,
            "prompt_sizes": list(cfg.prompt_sizes),
            "decode_tokens": cfg.decode_tokens,
            "decode_prompt_tokens": DECODE_PROMPT,
            "sampling": "greedy",
        },
        machine={
            "cpus": os.cpu_count(),
            "mem_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "membw_gbs": bw["gbs"],
            "membw_threads": cfg.threads,
            "membw_bytes": bw["bytes"],
            # other work on the machine skews every number; the 1-minute load average says how much
            "loadavg_1m": [load_before, os.getloadavg()[0]],
        },
        systems=results,
        ratios=ratios,
    )


# ---- workers: each runs in its own process and prints one JSON line ----------------------


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _edgert_worker(spec: dict) -> dict:
    import edgert
    from edgert.generate import generate_step
    from edgert.sample import make_sampler

    t0 = time.monotonic()
    llm = edgert.load(spec["model"], context=spec["ctx"], threads=spec["threads"], kv_bits=spec["kv_bits"])
    load_s = time.monotonic() - t0
    steps = generate_step(llm.session, spec["decode_prompt"], make_sampler(), spec["decode_tokens"])
    tokens = [next(steps)]
    t_first = time.monotonic()
    if spec.get("warmup"):
        return {}
    tokens += list(steps)
    decode_s = time.monotonic() - t_first
    prompt_tps = {}
    for n, ids in spec["prompts"].items():
        llm.session.reset()
        t = time.monotonic()
        llm.session.prefill(ids)
        prompt_tps[n] = len(ids) / (time.monotonic() - t)
    return _result(spec, load_s, t_first, tokens, decode_s, prompt_tps)


def no_extra_buffer_types(llama_cpp) -> None:
    """Load llama.cpp weights without its repacked "extra" buffer types.

    A native build on a CPU that reports AMX uses AMX tiles for Q4/Q8 matmuls; sandboxes that do not
    grant the tile state kill the process with SIGILL. The plain CPU path computes the same model.
    (Also used by tests/tools/make_golden.py, which loads this file by path.)
    """
    low = llama_cpp.llama_cpp
    if getattr(low.llama_model_default_params, "_edgert_patched", False):
        return
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._edgert_patched = True
    low.llama_model_default_params = params


def _llama_worker(spec: dict) -> dict:
    import llama_cpp
    import numpy as np

    no_extra_buffer_types(llama_cpp)
    t0 = time.monotonic()
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=spec["ctx"],
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        n_batch=512,
        use_mmap=spec["mmap"],
        seed=0,
        verbose=False,
    )
    load_s = time.monotonic() - t0
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    llm.eval(spec["decode_prompt"])
    tokens = [greedy()]
    t_first = time.monotonic()
    if spec.get("warmup"):
        return {}
    for _ in range(spec["decode_tokens"] - 1):
        llm.eval([tokens[-1]])
        tokens.append(greedy())
    decode_s = time.monotonic() - t_first
    prompt_tps = {}
    for n, ids in spec["prompts"].items():
        llm.reset()
        t = time.monotonic()
        llm.eval(ids)
        prompt_tps[n] = len(ids) / (time.monotonic() - t)
    return _result(spec, load_s, t_first, tokens, decode_s, prompt_tps)


def _result(spec, load_s, t_first, tokens, decode_s, prompt_tps) -> dict:
    return dict(
        system=spec["system"],
        load_s=load_s,
        cold_start_s=t_first - spec["t_spawn"],
        decode_tps=(len(tokens) - 1) / decode_s if decode_s > 0 else 0.0,
        prompt_tps=prompt_tps,
        peak_rss=_peak_rss(),
        threads=spec["threads"],
        tokens=tokens,
    )


def _membw_worker(spec: dict) -> dict:
    """Best of 5 parallel passes summing a large float32 array: the streaming-read limit."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=True)  # fastmath: a vectorized, reordered sum
    def stream_sum(a):
        s = 0.0
        for i in numba.prange(a.size):
            s += a[i]
        return s

    numba.set_num_threads(min(spec["threads"], numba.config.NUMBA_NUM_THREADS))
    a = np.ones(spec["mib"] << 18, np.float32)
    stream_sum(a)  # compile, and fault the pages in
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        stream_sum(a)
        best = min(best, time.perf_counter() - t)
    return {"gbs": a.nbytes / best / 1e9, "bytes": a.nbytes}


WORKERS = {EDGERT: _edgert_worker, LLAMA: _llama_worker, LLAMA_NOMMAP: _llama_worker, "membw": _membw_worker}


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: python -m edgert.bench worker SPEC_JSON (run by `edgert bench`)")
    spec = json.loads(sys.argv[2])
    print(json.dumps(WORKERS[spec["system"]](spec)))
