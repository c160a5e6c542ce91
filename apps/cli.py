"""The `edgert` command line: run, chat, info, pull. All printing and exiting happens here."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from edgert.apps import plan as plan_cmd

from edgert.jit import kernels_cached, mark_kernels_cached

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="edgert: run language models larger than the device.",
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[str, typer.Argument(help="A .gguf file, an HF safetensors folder, or a model name.")]
Ctx = Annotated[int, typer.Option("-c", "--ctx", help="Context length in tokens.", min=16)]
Threads = Annotated[Optional[int], typer.Option("-t", "--threads", help="Compute threads.", min=1)]  # noqa: UP045
MaxTok = Annotated[int, typer.Option("-n", "--max-tokens", help="Tokens to generate.", min=1)]
Temp = Annotated[float, typer.Option("--temperature", "--temp", help="0 = greedy.", min=0.0)]
TopK = Annotated[int, typer.Option("--top-k", help="0 = off.", min=0)]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]
MinP = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0)]
Seed = Annotated[Optional[int], typer.Option("--seed")]  # noqa: UP045
RepPen = Annotated[float, typer.Option("--repeat-penalty", min=0.0)]
Budget = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--memory-budget",
        "-m",
        help="Everything the process may hold (1.5GiB, 800MB, or 40% of the weights); "
        "weights that do not fit stream from disk.",
    ),
]
Profile = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--profile", help="Device profile for the memory plan's prediction (name or TOML)."),
]
KvBits = Annotated[int, typer.Option("--kv-bits", help="KV cache: 16 (fp16), 8, or 4 (KIVI).")]
Parity = Annotated[
    bool,
    typer.Option(
        "--llama-parity",
        help="Compute as llama.cpp does, bit for bit (all block types but Q5_K); slower.",
    ),
]


def _cache_dir() -> Path | None:
    d = os.environ.get("EDGERT_HOME")
    return Path(d) if d else None


def _home() -> Path:
    from edgert import hub

    return _cache_dir() or hub.default_cache_dir()


def _progress():
    """A one-line progress display on stderr (only when it is a terminal)."""
    tty = sys.stderr.isatty()
    last = [""]

    def show(what: str, done: int, total: int) -> None:
        if total > 1 << 20:
            line = f"{what}: {done / 2**20:7.1f} / {total / 2**20:.1f} MiB ({100 * done / total:3.0f}%)"
        else:
            line = f"{what}: {done}/{total}"
        if tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if done >= total else ""))
            sys.stderr.flush()
        elif what != last[0]:  # a log gets each step's first line
            sys.stderr.write(line + "\n")
        last[0] = what

    return show


COMPILE_NOTICE = "compiling edgert's kernels (once, after an install; about a minute)..."


def _load(
    model: str,
    ctx: int,
    threads: int | None,
    kv_bits: int = 16,
    memory_budget: str | None = None,
    profile=None,
    llama_parity: bool = False,
):
    from edgert.quant.kv import check_kv_bits

    from edgert import LLM, loader
    from edgert.api import set_threads

    set_threads(threads)
    check_kv_bits(kv_bits)
    src = loader.open_source(loader.resolve(model, _cache_dir(), _progress()))  # bad input fails here
    budget = plan_cmd.parse_budget(memory_budget, src.store.nbytes()) if memory_budget else None
    if budget is None and not kernels_cached(_home()):  # a budget compiles them all first, with progress
        typer.echo(COMPILE_NOTICE, err=True)
    return LLM(
        src,
        context=ctx,
        memory_budget=budget,
        profile=profile,
        kv_bits=kv_bits,
        cache_dir=_cache_dir(),
        pack_stream=plan_cmd.pack_stream(),
        progress=_progress(),
        llama_parity=llama_parity,
    )


def _stats_line(st) -> str:
    line = (
        f"prompt: {st.prompt_tokens} tok ({st.cached_tokens} cached), {st.prompt_tps:.1f} tok/s | "
        f"decode: {st.generation_tokens} tok, {st.generation_tps:.1f} tok/s | "
        f"TTFT {st.time_to_first_token * 1000:.0f} ms | peak RSS {st.peak_rss / 2**20:.0f} MiB"
    )
    if st.streamed:
        pt = st.per_token()
        line += (
            f"\nstreaming, per decoded token: {pt['bytes_read'] / 2**20:.1f} MiB read, "
            f"{pt['compute_s'] * 1000:.0f} ms computing, {pt['io_wait_s'] * 1000:.0f} ms waiting on I/O"
        )
    return line


@app.command()
def run(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("-p", "--prompt", help="The prompt to complete.")],
    max_tokens: MaxTok = 128,
    temperature: Temp = 0.0,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    seed: Seed = None,
    repeat_penalty: RepPen = 1.0,
    ctx: Ctx = 4096,
    threads: Threads = None,
    kv_bits: KvBits = 16,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at end-of-sequence.")] = False,
    memory_budget: Budget = None,
    profile: Profile = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Print the memory plan too.")] = False,
    llama_parity: Parity = False,
) -> None:
    """Complete a prompt. Only the generated text goes to stdout; statistics go to stderr."""
    llm = _load(model, ctx, threads, kv_bits, memory_budget, profile, llama_parity)
    if verbose and llm.model.plan is not None:
        typer.echo(plan_cmd.plan_summary(llm.model.plan), err=True)
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    for r in llm.stream(
        prompt, max_tokens=max_tokens, ignore_eos=ignore_eos, repetition_penalty=repeat_penalty, **opts
    ):
        sys.stdout.write(r.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    typer.echo(_stats_line(llm.stats), err=True)
    mark_kernels_cached(_home())


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="Model (default: SmolLM2-135M-Instruct).")] = "smollm2-135m",
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="A system prompt.")] = None,  # noqa: UP045
    max_tokens: MaxTok = 512,
    temperature: Temp = 0.0,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    seed: Seed = None,
    repeat_penalty: RepPen = 1.0,
    ctx: Ctx = 4096,
    threads: Threads = None,
    memory_budget: Budget = None,
    profile: Profile = None,
    kv_bits: KvBits = 16,
    llama_parity: Parity = False,
) -> None:
    """Chat with a model. /reset clears the conversation, /stats shows speed, /exit quits.

    Ctrl-C stops the current answer; standard input may be piped (one message per line).
    """
    import edgert

    llm = _load(model, ctx, threads, kv_bits, memory_budget, profile, llama_parity)
    tty = sys.stdin.isatty()
    opts = dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        repetition_penalty=repeat_penalty,
    )
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    if tty:
        typer.echo(f"edgert chat · {Path(str(llm.source.path)).name} · /reset /stats /exit", err=True)
    while True:
        try:
            line = input("> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            if tty:
                typer.echo("", err=True)
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(base)
            llm.reset()
            typer.echo("(conversation cleared)", err=True)
            continue
        if line == "/stats":
            typer.echo(_stats_line(llm.stats), err=True)
            continue
        messages.append({"role": "user", "content": line})
        answer = []
        try:
            for r in llm.stream_chat(messages, **opts):
                answer.append(r.text)
                sys.stdout.write(r.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except edgert.ContextError as e:
            messages.pop()
            typer.echo(f"\nerror: {e} (/reset starts over)", err=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(answer)})
        mark_kernels_cached(_home())  # the first answer compiled what a chat uses


@app.command()
def info(model: ModelArg) -> None:
    """Architecture, parameter count, block types and bytes per layer."""
    from edgert.quant.formats import BLOCK_SIZE, TYPE_SIZE

    from edgert import loader

    src = loader.open_source(loader.resolve(model, _cache_dir(), _progress()))
    a, refs = src.args, src.store.refs
    params = sum(r.nbytes // TYPE_SIZE[r.qtype] * BLOCK_SIZE[r.qtype] for r in refs.values())
    by_type: Counter = Counter()
    for r in refs.values():
        by_type[r.qtype.name] += r.nbytes
    total = sum(by_type.values())
    typer.echo(f"model          {src.path}")
    typer.echo(f"architecture   {a.arch} ({src.kind})")
    typer.echo(f"parameters     {params / 1e6:.1f} M, {total / 2**20:.1f} MiB of weights")
    typer.echo(
        f"layers         {a.n_layers} · dim {a.dim} · heads {a.n_heads}/{a.n_kv_heads} kv · head_dim "
        f"{a.head_dim} · ffn {a.ffn_dim}"
    )
    if a.n_experts:
        typer.echo(
            f"experts        {a.n_experts} ({a.n_experts_used} active) · expert ffn {a.expert_ffn_dim}"
        )
    typer.echo(f"context        {a.context_length} · vocab {a.vocab_size} · rope base {a.rope_base:g}")
    typer.echo("block types    " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in by_type.most_common()))
    per_layer = [src.store.nbytes(f"blk.{i}.") for i in range(a.n_layers)]
    typer.echo(
        f"bytes/layer    {min(per_layer) / 2**20:.2f}–{max(per_layer) / 2**20:.2f} MiB "
        f"(embedding {src.store.nbytes('token_embd') / 2**20:.1f} MiB, "
        f"output {src.store.nbytes('output.') / 2**20:.1f} MiB)"
    )
    for i, b in enumerate(per_layer):
        typer.echo(f"  blk.{i:<3d} {b / 2**20:8.2f} MiB")


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="A model name (see `edgert pull --list`).")] = "",
    list_: Annotated[bool, typer.Option("--list", help="List the models that can be pulled.")] = False,
) -> None:
    """Fetch a known model into the cache, verifying its sha256."""
    from edgert import hub

    if list_ or not name:
        for m in hub.MODELS.values():
            typer.echo(
                f"{m.name:22s} {m.filename} ({m.size / 2**20:.0f} MiB)  aliases: {', '.join(m.aliases)}"
            )
        return
    typer.echo(str(hub.pull(name, _cache_dir(), _progress())))


from edgert.apps.bench import bench  # noqa: E402

app.command()(bench)


from edgert.apps.perplexity import perplexity  # noqa: E402

app.command()(perplexity)

app.command("plan")(plan_cmd.plan)
app.command("profile")(plan_cmd.profile)


def main() -> None:
    from edgert.errors import EdgertError

    try:
        app(standalone_mode=False)
    except EdgertError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # bad flags and arguments (typer's click errors)
        code = getattr(e, "exit_code", 2)
        hint = " (see --help)" if code == 2 else ""
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        if not msg:  # no arguments: the help was the answer
            sys.exit(0)
        typer.echo(f"error: {msg}{hint}", err=True)
        sys.exit(code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
