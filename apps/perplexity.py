"""`edgert perplexity`: the table printed and the JSON written from `edgert.perplexity`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def _bits(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text}: give bits as 16, 8 or 4 (or a list: 8,4)") from None


def format_report(rep) -> str:
    n_scored = rep.settings[0].n_scored
    out = [
        f"model   {rep.model} ({rep.arch})",
        f"text    {rep.text}: {rep.n_tokens} tokens = {rep.n_chunks} chunks of ctx {rep.ctx}, "
        f"{n_scored} scored · threads {rep.threads}",
        f"method  {rep.method}",
        "",
    ]
    head = ["system", "KV", "KV MiB @ctx", "PPL", "vs ref", "top-1 agree", "KL(ref||kv)", "prompt tok/s"]
    if rep.decode:
        head.append(f"decode tok/s @{rep.ctx}")
    rows = [head]
    refs = {s.system: s for s in rep.settings if s.is_reference}
    for s in rep.settings:
        ref = refs.get(s.system)
        rows.append(
            [
                s.system,
                s.kv,
                f"{s.kv_bytes / 2**20:.1f}",
                f"{s.ppl:.4f}",
                "ref" if s.is_reference else f"{100 * (s.ppl / ref.ppl - 1):+.2f}%",
                "" if s.is_reference else f"{100 * s.top1_agreement:.2f}%",
                "" if s.is_reference else f"{s.mean_kl:.5f}",
                f"{s.prompt_tps:.1f}",
            ]
            + ([f"{s.decode_tps:.1f}"] if rep.decode else [])
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        cells = zip(r, widths, strict=True)
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells)))
    return "\n".join(out)


def perplexity(
    model: Annotated[str, typer.Argument(help="A .gguf file, an HF safetensors folder, or a model name.")],
    text: Annotated[Path, typer.Option("--text", help="The UTF-8 text file to evaluate.")],
    ctx: Annotated[int, typer.Option("-c", "--ctx", help="Chunk length in tokens (even).", min=4)] = 512,
    kv_bits: Annotated[
        str, typer.Option("--kv-bits", help="KV cache bits: 16, 8, 4, or a list (8,4).")
    ] = "16",
    compare_kv_bits: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--compare-kv-bits", help="Reference setting, run on the same tokens (e.g. 16)."),
    ] = None,
    chunks: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--chunks", help="Evaluate only the first N chunks (default: all).", min=1),
    ] = None,
    decode: Annotated[
        int, typer.Option("--decode", help="Also time decoding the last N tokens of a full context.", min=0)
    ] = 0,
    threads: Annotated[Optional[int], typer.Option("-t", "--threads", min=1)] = None,  # noqa: UP045
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results here.")] = None,  # noqa: UP045
    vs: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--vs", help="llama.cpp: also its f16 and q4_0 KV caches on the same tokens."),
    ] = None,
    llama_python: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--llama-python", help="A Python with llama-cpp-python (default: this one)."),
    ] = None,
) -> None:
    """Perplexity by llama.cpp's sliding-window method, and the cost of a quantized KV cache.

    The text is cut into chunks of ctx tokens (BOS first where the model adds one); each chunk
    starts from an empty cache and only its second half is scored. With --compare-kv-bits R,
    setting R runs on the same tokens as the reference: every other setting reports its top-1
    agreement with R and the mean KL(R || setting) over the scored positions.
    """
    from edgert.perplexity import perplexity as run

    if vs is not None and vs.lower() not in ("llama.cpp", "llama-cpp", "llamacpp"):
        raise typer.BadParameter(f"{vs}: the only system to compare with is llama.cpp", param_hint="--vs")
    settings = ([compare_kv_bits] if compare_kv_bits is not None else []) + _bits(kv_bits)

    def say(msg: str) -> None:
        sys.stderr.write(f"perplexity: {msg}\n")
        sys.stderr.flush()

    rep = run(model, str(text), ctx, settings, chunks, decode, threads, vs is not None, llama_python, say)
    typer.echo(format_report(rep))
    if json_out:
        json_out.write_text(json.dumps(rep.to_dict(), indent=1) + "\n")
