"""Perplexity by llama.cpp's sliding-window method, and what a KV cache setting costs.

Method (that of llama.cpp's `llama-perplexity`): the text is tokenized once (no BOS) and cut
into consecutive, non-overlapping chunks of `ctx` tokens; the first token of each chunk is
replaced by BOS where the model adds one. Each chunk is evaluated from an empty cache, and
only the second half is scored: the logits at positions ctx/2 .. ctx-2 predict the next token,
so every scored token sees at least ctx/2 tokens of context. PPL = exp(mean negative log
likelihood over the scored tokens).

Several KV settings run in lockstep over the same chunks (one model, one cache each). The
first is the reference: each other setting reports its top-1 agreement with it and the mean
KL(reference || setting) over the scored positions. Decode speed at a full context is
timed at the end of the last chunk: its last `decode` tokens are rolled back (`trim`) and
decoded again one at a time.

`run_llama` does the same in llama.cpp (through llama-cpp-python, in its own process, with
an f16 and a q4_0 KV cache) on the same token ids. This file is also that worker: run by
path under an interpreter that may lack edgert, so its top level imports only the standard
library and numpy.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

SCHEMA = "edgert-perplexity/1"
METHOD = (
    "llama.cpp sliding window: non-overlapping chunks of ctx tokens (BOS first where the model "
    "adds one), each from an empty cache, scoring the second half"
)
ROWS = 64  # logit rows turned into log-probabilities at a time (bounds the float64 scratch)
GGML_F16, GGML_Q4_0 = 1, 2


@dataclass
class SettingResult:
    """One system and KV setting over the evaluation's tokens."""

    system: str  # "edgert" | "llama.cpp"
    kv: str  # "16-bit", "8-bit", "4-bit"; llama.cpp: "f16", "q4_0"
    nll_sum: float = 0.0
    n_scored: int = 0
    agree: int = 0  # top-1 equal to the reference's
    kl_sum: float = 0.0  # KL(reference || this), summed over scored positions
    kv_bytes: int = 0  # the KV cache holding ctx tokens
    prompt_seconds: float = 0.0
    prompt_tokens: int = 0
    decode_tps: float = 0.0  # at a full context
    is_reference: bool = False

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_scored) if self.n_scored else float("nan")

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.n_scored if self.n_scored else float("nan")

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.n_scored if self.n_scored else float("nan")

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ppl=self.ppl, top1_agreement=self.top1_agreement, mean_kl=self.mean_kl)
        d.update(prompt_tps=self.prompt_tps)
        return d


@dataclass
class Report:
    model: str
    arch: str
    text: str
    ctx: int
    n_chunks: int
    n_tokens: int  # evaluated (n_chunks * ctx)
    threads: int
    decode: int  # tokens decoded at the end to time decode speed
    settings: list[SettingResult] = field(default_factory=list)
    method: str = METHOD

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "settings"}
        return {"schema": SCHEMA, **d, "settings": [s.to_dict() for s in self.settings]}


# ---- scoring (numpy only: shared with the llama.cpp worker) ------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    x -= np.log(np.exp(x).sum(-1, keepdims=True))
    return x


def score(logits: np.ndarray, targets: np.ndarray, res: SettingResult, ref: np.ndarray | None = None):
    """Add rows of logits predicting `targets` to res; `ref` is the reference's log-probabilities
    for the same rows (None: this is the reference). Returns this setting's log-probabilities."""
    lp = log_softmax(logits)
    res.nll_sum += float(-lp[np.arange(len(targets)), targets].sum())
    res.n_scored += len(targets)
    if ref is not None:
        res.agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
        res.kl_sum += float((np.exp(ref) * (ref - lp)).sum())
    return lp


def chunks(tokens, ctx: int, n_chunks: int, bos_id: int | None) -> list[list[int]]:
    out = []
    for c in range(n_chunks):
        ids = list(tokens[c * ctx : (c + 1) * ctx])
        if bos_id is not None:
            ids[0] = bos_id
        out.append(ids)
    return out


def spans(ctx: int, step: int) -> list[tuple[int, int, bool]]:
    """(start, stop, scored) pieces of a chunk of at most `step` tokens; the scored ones lie in
    the second half, where every position's logits are needed."""
    first = ctx // 2
    out = [(s, min(s + step, first), False) for s in range(0, first, step)]
    return out + [(s, min(s + step, ctx), True) for s in range(first, ctx, step)]


# ---- edgert -------------------------------------------------------------------------------


def evaluate(model, tokens, ctx: int, kv_bits, bos_id: int | None, n_chunks: int, decode: int = 0):
    """Evaluate `model` (an edgert Transformer whose context is >= ctx) over the first n_chunks
    chunks of `tokens`, with one KV cache per entry of kv_bits (the first is the reference).

    Returns a list of SettingResult, in kv_bits's order.
    """
    from edgert.quant.kv import cache_bytes

    a = model.args
    caches = [model.make_cache(b) for b in kv_bits]
    results = [
        SettingResult(
            "edgert",
            f"{b}-bit",
            kv_bytes=cache_bytes(b, a.n_layers, len(model.shard.kv), a.head_dim, ctx),
            is_reference=i == 0,
        )
        for i, b in enumerate(kv_bits)
    ]
    for ids in chunks(tokens, ctx, n_chunks, bos_id):
        arr = np.asarray(ids, np.int32)
        for cache in caches:
            for c in cache:
                c.trim(c.offset)
        for s0, s1, scored in spans(ctx, model.max_tokens):
            ref = None
            for cache, res in zip(caches, results, strict=True):
                t = time.perf_counter()
                logits = model(arr[s0:s1], cache, s0, all_logits=scored)
                res.prompt_seconds += time.perf_counter() - t
                res.prompt_tokens += s1 - s0
                if scored:
                    stop = min(s1, ctx - 1)  # the last position predicts nothing inside the chunk
                    lp = score(logits[: stop - s0], arr[s0 + 1 : stop + 1], res, ref)
                    ref = lp if ref is None else ref
    if decode:
        for cache, res in zip(caches, results, strict=True):
            res.decode_tps = _time_decode(model, cache, arr, decode)
    return results


def _time_decode(model, cache, ids: np.ndarray, n: int) -> float:
    """Roll the last n tokens of a full cache back and decode them one at a time; tok/s."""
    pos = len(ids) - n
    for c in cache:
        c.trim(c.offset - pos)
    t = time.perf_counter()
    for i in range(pos, len(ids)):
        model(ids[i : i + 1], cache, i)
    return n / (time.perf_counter() - t)


def perplexity(
    model: str,
    text: str,
    ctx: int = 512,
    kv_bits=(16,),
    n_chunks: int | None = None,
    decode: int = 0,
    threads: int | None = None,
    vs_llama: bool = False,
    llama_python: str | None = None,
    progress=None,
) -> Report:
    """Evaluate `model` (path or name) on the text file `text` at each KV setting in kv_bits (the
    first is the reference); with vs_llama, llama.cpp's f16 and q4_0 KV caches on the same tokens.

    Raises:
        OptionError: a missing text file, a bad setting, a text shorter than ctx, no llama.cpp.
        ContextError: ctx exceeds the model's trained context.
        FormatError, ModelNotFoundError: as `edgert.load`.
    """
    from pathlib import Path

    import numba

    from edgert import loader
    from edgert.api import set_threads
    from edgert.errors import ContextError, OptionError
    from edgert.quant.kv import check_kv_bits

    say = progress or (lambda _msg: None)
    kv_bits = list(dict.fromkeys(check_kv_bits(b) for b in kv_bits))
    path = Path(text).expanduser()
    if not path.is_file():
        raise OptionError(f"{text}: no such text file")
    if ctx < 4 or ctx % 2:
        raise OptionError(f"ctx must be an even number >= 4, not {ctx}")
    if decode < 0 or decode >= ctx // 2:
        raise OptionError(f"--decode must be in [0, {ctx // 2}), not {decode}")
    set_threads(threads)
    src = loader.open_source(loader.resolve(model))
    if ctx > src.args.context_length:
        raise ContextError(
            f"ctx {ctx} exceeds the model's trained context of {src.args.context_length} tokens"
        )
    tok = src.tokenizer
    tokens = tok.encode(path.read_text(encoding="utf-8", errors="replace"), add_bos=False)
    available = len(tokens) // ctx
    if available < 1:
        raise OptionError(f"{text} has {len(tokens)} tokens, fewer than one chunk of ctx {ctx}")
    n_chunks = min(n_chunks or available, available)
    bos = tok.bos_id if tok.add_bos else None
    rep = Report(
        str(src.path),
        src.args.arch,
        str(path),
        ctx,
        n_chunks,
        n_chunks * ctx,
        numba.get_num_threads(),
        decode,
    )
    llama_py = _llama_python(llama_python) if vs_llama else None
    say(f"edgert: {n_chunks} chunks of {ctx} tokens, KV {', '.join(f'{b}-bit' for b in kv_bits)}")
    m = loader.build(src, context=ctx)
    rep.settings = evaluate(m, tokens, ctx, kv_bits, bos, n_chunks, decode)
    if llama_py:
        from edgert.quant.kv import bytes_per_token

        a = src.args
        f16 = a.n_layers * bytes_per_token(16, a.n_kv_heads, a.head_dim) * ctx
        spec = dict(
            model=str(Path(src.path).resolve()),
            ctx=ctx,
            n_batch=min(512, ctx),
            threads=rep.threads,
            chunks=chunks(tokens, ctx, n_chunks, bos),
            decode=decode,
            kv_bytes={"f16": f16, "q4_0": f16 * 18 // 64},  # q4_0: 18 bytes per 32 values
        )
        say("llama.cpp: f16 and q4_0 KV caches, flash attention")
        try:
            rep.settings += run_llama(llama_py, spec)
        except LlamaError as e:
            raise OptionError(str(e)) from None
    return rep


def _llama_python(path: str | None) -> str:
    from edgert.bench import BenchError, find_llama_python
    from edgert.errors import OptionError

    try:
        return find_llama_python(path)
    except BenchError as e:
        raise OptionError(str(e)) from None


# ---- llama.cpp ----------------------------------------------------------------------------


class LlamaError(Exception):
    """The llama.cpp run failed; the message says why."""


def run_llama(python: str, spec: dict, timeout: float = 3600.0) -> list[SettingResult]:
    """Run the llama.cpp worker (this file, by path) under `python`; spec as `_llama_worker` reads."""
    from edgert.workers import WorkerError, run_worker, worker_command

    try:
        out = run_worker(worker_command(python, __file__), spec, timeout, stdin=True)
    except WorkerError as e:
        raise LlamaError(f"the llama.cpp run failed: {e}") from None
    return [SettingResult(**d) for d in out]


def _llama_worker(spec: dict) -> list[dict]:
    """llama.cpp with an f16 KV cache (the reference) and a q4_0 one, flash attention on,
    over spec's chunks; the same scoring as `evaluate`."""
    import runpy
    from pathlib import Path

    import llama_cpp

    bench = runpy.run_path(str(Path(__file__).with_name("bench.py")))  # stdlib only, like this file
    bench["no_extra_buffer_types"](llama_cpp)  # or llama.cpp dies with SIGILL in this sandbox
    ctx, n_batch = spec["ctx"], spec["n_batch"]
    llms, results = [], []
    for kv, t in (("f16", GGML_F16), ("q4_0", GGML_Q4_0)):
        llms.append(
            llama_cpp.Llama(
                model_path=spec["model"],
                n_ctx=ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=spec["threads"],
                n_threads_batch=spec["threads"],
                type_k=t,
                type_v=t,
                flash_attn=True,
                swa_full=True,  # gemma3: a whole-context cache on sliding layers too, so it rolls back
                logits_all=False,  # logits are read per batch below, not kept for the whole context
                seed=0,
                verbose=False,
            )
        )
        results.append(
            SettingResult("llama.cpp", kv, kv_bytes=spec["kv_bytes"][kv], is_reference=kv == "f16")
        )
    n_vocab = llms[0].n_vocab()

    def run(llm, ids, n_past) -> np.ndarray:
        llm._batch.set_batch(batch=ids, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)  # llama-cpp-python's own eval() does the same
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(ids), n_vocab))

    for ids in spec["chunks"]:
        for llm in llms:
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        for s0, s1, scored in spans(ctx, n_batch):
            lps = {}
            for llm, res in zip(llms, results, strict=True):
                t = time.perf_counter()
                logits = run(llm, ids[s0:s1], s0)
                res.prompt_seconds += time.perf_counter() - t
                res.prompt_tokens += s1 - s0
                if not scored:
                    continue
                stop = min(s1, ctx - 1)
                for r0 in range(s0, stop, ROWS):
                    r1 = min(r0 + ROWS, stop)
                    tg = np.asarray(ids[r0 + 1 : r1 + 1])
                    lp = score(logits[r0 - s0 : r1 - s0], tg, res, lps.get(r0))
                    lps.setdefault(r0, lp)
    n = spec["decode"]
    if n:
        ids, pos = spec["chunks"][-1], ctx - spec["decode"]
        for llm, res in zip(llms, results, strict=True):
            if not llm._ctx.kv_cache_seq_rm(-1, pos, -1):
                raise RuntimeError("llama.cpp could not roll its KV cache back")
            t = time.perf_counter()
            for i in range(pos, ctx):
                run(llm, ids[i : i + 1], i)
            res.decode_tps = n / (time.perf_counter() - t)
    return [asdict(r) for r in results]


if __name__ == "__main__":
    print(json.dumps(_llama_worker(json.loads(sys.stdin.read()))))
