"""`edgert bench`: the table printed and the JSON written from `edgert.bench.run_bench`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgert.bench import EDGERT, LLAMA, LLAMA_NOMMAP, LLAMA_NOTE, BenchConfig, BenchError, BenchResult

ROWS = [  # metric, label, scale, format
    ("load_s", "load (s)", 1.0, "{:.2f}"),
    ("cold_start_s", "cold start to 1st token (s)", 1.0, "{:.2f}"),
    ("decode_tps", "decode tok/s", 1.0, "{:.2f}"),
    ("peak_rss", "peak RSS (MiB)", 1 / 2**20, "{:.0f}"),
]


def _cell(s, scale: float, fmt: str) -> str:
    f = fmt.format
    return f"{f(s.median * scale)} [{f(s.min * scale)}–{f(s.max * scale)}] ±{s.spread_pct / 2:.0f}%"


def format_table(res: BenchResult) -> str:
    st = res.settings
    names = [n for n in (EDGERT, LLAMA, LLAMA_NOMMAP) if n in res.systems]
    prompt_rows = [(f"prompt{n}_tps", f"prompt {n} tok/s", 1.0, "{:.1f}") for n in st["prompt_sizes"]]
    rows = ROWS[:2] + prompt_rows + ROWS[2:]
    ratio_key = {"peak_rss": "peak_rss_vs_no_mmap"}
    head = ["metric"] + names + (["edgert / llama.cpp"] if res.ratios else [])
    table = [head]
    for key, label, scale, fmt in rows:
        line = [label] + [_cell(res.systems[n].stats[key], scale, fmt) for n in names]
        if res.ratios:
            r = res.ratios.get(ratio_key.get(key, key))
            line.append(f"{r:.2f}" + (" (vs no-mmap)" if key == "peak_rss" else "") if r else "")
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    out = [
        f"model     {res.model} ({res.arch}, {res.model_bytes / 2**20:.0f} MiB)",
        f"settings  threads {st['threads']} · ctx {st['ctx']} · edgert KV "
        f"{res.systems[EDGERT].settings.get('kv_bits', 16)}-bit · {st['repeat']} runs each (median "
        f"[min–max] ±half-range) · decode {st['decode_tokens']} greedy tokens after "
        f"{st['decode_prompt_tokens']}",
    ]
    if LLAMA in res.systems:
        ll = res.systems[LLAMA].settings
        out.append(f"llama.cpp n_batch 512 · use_mmap {ll['use_mmap']} · {LLAMA_NOTE}")
    out.append("")
    for r in table:
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    m = res.machine
    out.append("")
    wpt = res.weights_per_token
    used = " · ".join(
        f"{n} {wpt * res.systems[n].stats['decode_tps'].median / 1e9:.2f} GB/s"
        for n in names
        if n != LLAMA_NOMMAP
    )
    out.append(f"weights read per decoded token  {wpt / 2**20:.1f} MiB → bandwidth used: {used}")
    out.append(
        f"machine memory bandwidth        {m['membw_gbs']:.1f} GB/s "
        f"({m['membw_threads']} threads, streaming read)"
    )
    la = m["loadavg_1m"]
    out.append(f"load average (1 min)            {la[0]:.1f} before, {la[1]:.1f} after ({m['cpus']} CPUs)")
    return "\n".join(out)


def bench(
    model: Annotated[str, typer.Argument(help="A .gguf file, an HF safetensors folder, or a model name.")],
    threads: Annotated[int | None, typer.Option("-t", "--threads", help="Default: all cores.", min=1)] = None,
    ctx: Annotated[int, typer.Option("-c", "--ctx", help="Context length, both systems.", min=16)] = 4096,
    repeat: Annotated[
        int | None,
        typer.Option("--repeat", help="Runs per system (default 3; 1 with --quick or a budget).", min=1),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
    vs: Annotated[str | None, typer.Option("--vs", help="Compare with: llama.cpp.")] = None,
    llama_python: Annotated[
        str | None,
        typer.Option("--llama-python", help="A Python with llama-cpp-python (default: this one)."),
    ] = None,
    llama_mmap: Annotated[
        bool, typer.Option("--llama-mmap/--llama-no-mmap", help="llama.cpp's use_mmap.")
    ] = True,
    quick: Annotated[
        bool, typer.Option("--quick", help="Small sizes: prompts 32 and 64, decode 16.")
    ] = False,
    kv_bits: Annotated[int, typer.Option("--kv-bits", help="edgert's KV cache: 16, 8 or 4.")] = 16,
    memory_budget: Annotated[
        list[str] | None,
        typer.Option(
            "--memory-budget",
            "-m",
            help="Decode under this budget (repeatable), each run in a memory cgroup of that size "
            "with the page cache dropped first (needs root).",
        ),
    ] = None,
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", help="Tokens decoded per run under a budget.", min=1)
    ] = 8,
) -> None:
    """Load time, cold start, prompt and decode tok/s, peak RSS; with --vs llama.cpp, side by side.

    With --memory-budget: decode speed under each budget beside llama.cpp (mmap) in the same
    cgroup limit, and beside the disk limit measured in the same run.
    """
    from edgert.quant.kv import check_kv_bits

    if vs is not None and vs.lower() not in ("llama.cpp", "llama-cpp", "llamacpp"):
        raise typer.BadParameter(f"{vs}: the only system to compare with is llama.cpp", param_hint="--vs")
    if memory_budget:
        rounds = repeat or 1
        _bench_stream(model, memory_budget, threads, ctx, decode_tokens, vs, llama_python, json_out, rounds)
        return
    cfg = BenchConfig(
        model=model,
        threads=threads or len(os.sched_getaffinity(0)),
        ctx=ctx,
        repeat=repeat or (1 if quick else 3),
        prompt_sizes=(32, 64) if quick else (128, 512),
        decode_tokens=16 if quick else 128,
        vs_llama=vs is not None,
        llama_python=llama_python,
        llama_mmap=llama_mmap,
        membw_mib=256 if quick else 1024,
        cache_dir=Path(os.environ["EDGERT_HOME"]) if os.environ.get("EDGERT_HOME") else None,
        kv_bits=check_kv_bits(kv_bits),
    )
    from edgert.bench import run_bench
    from edgert.errors import EdgertError

    def say(msg: str) -> None:
        sys.stderr.write(f"bench: {msg}\n")
        sys.stderr.flush()

    try:
        res = run_bench(cfg, say)
    except BenchError as e:  # cli.main prints EdgertErrors as one line and exits 1
        raise EdgertError(str(e)) from None
    typer.echo(format_table(res))
    if json_out:
        json_out.write_text(json.dumps(res.to_dict(), indent=1) + "\n")


def _bench_stream(model, budgets, threads, ctx, decode_tokens, vs, llama_python, json_out, repeat) -> None:
    from edgert.apps.plan import parse_budget

    from edgert import loader
    from edgert.bench_stream import format_stream_table, run_stream_bench
    from edgert.errors import EdgertError

    src = loader.open_source(loader.resolve(model))
    sizes = [parse_budget(b, src.store.nbytes()).bytes for b in budgets]
    try:
        res = run_stream_bench(
            model,
            sizes,
            threads or len(os.sched_getaffinity(0)),
            ctx=min(ctx, 512) if ctx == 4096 else ctx,  # default: a short context under a budget
            decode_tokens=decode_tokens,
            llama_python=llama_python,
            vs_llama=vs is not None,
            progress=lambda m: (sys.stderr.write(f"bench: {m}\n"), sys.stderr.flush()),
            repeat=repeat,
        )
    except BenchError as e:
        raise EdgertError(str(e)) from None
    typer.echo(format_stream_table(res))
    if json_out:
        json_out.write_text(json.dumps(res.to_dict(), indent=1) + "\n")
