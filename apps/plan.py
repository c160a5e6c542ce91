"""`edgert plan` (print an offload plan) and `edgert profile` (measure this machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer


def _home() -> Path:
    return Path(os.environ.get("EDGERT_HOME") or Path("~/.cache/edgert").expanduser())


def parse_budget(text: str, weights: int):
    from edgert.offload.memory import Memory

    text = text.strip()
    try:
        if text.endswith("%"):  # a share of the model's weight bytes
            return Memory.of(weights * float(text[:-1]) / 100)
        return Memory.parse(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--memory-budget") from None


def plan(
    model: Annotated[str, typer.Argument(help="A .gguf file, an HF safetensors folder, or a model name.")],
    memory_budget: Annotated[
        str,
        typer.Option(
            "--memory-budget",
            "-m",
            help="Everything the process may hold: 800MB, 1.5GiB, 2G, or a share of the weights (40%).",
        ),
    ],
    profile: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--profile", help="A shipped profile name or a TOML path (default: see below)."),
    ] = None,
    ctx: Annotated[int, typer.Option("-c", "--ctx", help="Context length in tokens.", min=1)] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    kv_bits: Annotated[int, typer.Option("--kv-bits", help="KV cache: 16 (fp16), 8 or 4.")] = 16,
) -> None:
    """Plan which weights stay resident under a memory budget, and predict tokens per second.

    Without --profile, the plan uses this host's profile if `edgert profile` saved one,
    else the shipped laptop-8gb profile.
    """
    from edgert.offload.plan import kv_bytes_per_token, measured_overhead, plan_model
    from edgert.offload.profile import default_profile
    from edgert.quant.kv import KV_BITS, check_kv_bits
    from edgert.quant.pack import HAVE_VNNI

    from edgert import loader

    src = loader.open_source(loader.resolve(model, _home() if os.environ.get("EDGERT_HOME") else None))
    prof, which = default_profile(profile)
    budget = parse_budget(memory_budget, src.store.nbytes())
    overhead = measured_overhead()  # the same measure a run takes, in a process at the same point
    bits = check_kv_bits(kv_bits)
    packed = pack_stream() and HAVE_VNNI  # as `run` will stream
    p = plan_model(src.store, src.args, budget, ctx, prof, overhead=overhead, kv_bits=bits, packed=packed)
    kv_at = {b: kv_bytes_per_token(src.args, kv_bits=b, context=p.context) * p.context for b in KV_BITS}
    if as_json:
        extra = {"kv_bits": kv_bits, "kv_bytes_at_bits": kv_at}
        typer.echo(json.dumps({"model": str(src.path), **p.to_dict(), **extra}, indent=2))
        return
    if which:
        typer.echo(f"(profile: {which})", err=True)
    n_pinned, n_streamed = len(p.pinned), len(p.streamed)
    kinds = {}
    from edgert.offload.units import units

    for u in units(src.store, src.args):
        kinds.setdefault(u.kind, []).append(u.nbytes)
    summary = ", ".join(f"{len(v)} {k} ({_mib(sum(v))})" for k, v in kinds.items())
    line = typer.echo
    line(f"model          {src.path.name} ({src.args.arch}, {src.args.n_layers} layers)")
    line(f"units          {summary}")
    line(f"weights        {p.weight_bytes} (file size; pinned units count at their repacked size)")
    line(f"budget         {p.budget}   (minimum {p.minimum} at context {p.context})")
    line(
        f"  runtime {p.overhead} · KV cache {p.kv} ({p.context} tok) · workspace {p.workspace} · "
        f"pinned {p.pinned_bytes} · window {_slots(p)} = {p.window_bytes}"
    )
    line(f"  used {p.used}, headroom {p.budget - p.used}")
    line(
        f"KV cache       {kv_bits}-bit; at {p.context} tok: "
        + " · ".join(f"{b}-bit {_mib(n)}" for b, n in kv_at.items())
    )
    line(f"pinned         {n_pinned} units, {p.pinned_bytes}: {_names(p.pinned)}")
    line(f"streamed       {n_streamed} units, {p.streamed_per_token} read per token: {_names(p.streamed)}")
    if p.on_demand:
        line(f"on demand      {_names(p.on_demand)} (one row per token)")
    line(f"window         {_slots(p)}")
    s = p.seconds
    line(
        f"predicted      {p.tokens_per_second:.2f} tok/s ({p.seconds_per_token * 1000:.1f} ms/token) on "
        f"{p.profile}; bottleneck: {p.bottleneck} (disk {s['disk'] * 1000:.1f} ms, memory "
        f"{s['memory'] * 1000:.1f} ms, compute {s['compute'] * 1000:.1f} ms)"
    )


def pack_stream() -> bool:
    """EDGERT_PACKED_STREAM=0 streams a budget's weights from the model file's raw blocks
    instead of the packed copy in the cache (slower kernels; no extra file)."""
    return os.environ.get("EDGERT_PACKED_STREAM", "1").strip().lower() not in ("0", "false", "no", "off")


def plan_summary(p) -> str:
    """Three lines on what a loaded model's plan keeps and streams (for run --verbose)."""
    s = p.seconds
    return (
        f"memory plan: budget {p.budget}, used {p.used} (minimum {p.minimum})\n"
        f"  pinned {len(p.pinned)} units ({p.pinned_bytes}); streamed {len(p.streamed)} units, "
        f"{p.streamed_per_token} per token through {_slots(p)}\n"
        f"  predicted {p.tokens_per_second:.2f} tok/s on {p.profile}, bottleneck {p.bottleneck} "
        f"(disk {s['disk'] * 1000:.0f} ms, memory {s['memory'] * 1000:.0f} ms, "
        f"compute {s['compute'] * 1000:.0f} ms)"
    )


def _slots(p) -> str:
    """The streamer's ring and the expert cache, as slot counts."""
    parts = [f"{p.window} ring slots"] if p.window or not p.expert_slots else []
    if p.expert_slots:
        parts.append(f"{p.expert_slots} expert-cache slots")
    return " + ".join(parts) + f" of {p.slot}" + (" (packed)" if p.packed else "")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _names(names: tuple[str, ...], limit: int = 8) -> str:
    if not names:
        return "none"
    if len(names) <= limit:
        return ", ".join(names)
    return (
        ", ".join(names[: limit // 2])
        + f", ... ({len(names) - limit} more), "
        + ", ".join(names[-limit // 2 :])
    )


def profile(
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", "-o", help="Where to write the TOML (default: this host's profile)."),
    ] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Profile name (default: hostname).")] = None,  # noqa: UP045
    disk_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--disk-dir", help="Directory to measure disk reads in (default: the model cache)."),
    ] = None,
) -> None:
    """Measure this machine (RAM, disk and memory bandwidth, cores, kernel speed) and save a profile."""
    from edgert.offload.profile import host_profile_path, measure_profile, save_profile

    disk_dir = disk_dir or _home()
    disk_dir.mkdir(parents=True, exist_ok=True)
    typer.echo("measuring disk, memory and kernel throughput (about 10 s)...", err=True)
    p = measure_profile(name, disk_dir)
    path = save_profile(p, out or host_profile_path())
    typer.echo(
        f"{p.name}: RAM {p.ram_bytes / 2**30:.1f} GiB · disk {p.disk_read_bps / 1e6:.0f} MB/s · memory "
        f"{p.memory_bps / 1e9:.1f} GB/s · Q4_K matmul {p.kernel_bps / 1e9:.2f} GB/s · {p.cores} cores"
    )
    typer.echo(str(path))
