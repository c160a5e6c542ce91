"""Generation, in layers: `generate_step` yields token ids, `stream_generate` yields
`GenerationResponse`s with text and timing, `generate` returns a string.

A `Session` holds the model, its tokenizer, and one KV cache with the tokens it holds;
a new prompt reuses the cached prefix it shares with them (multi-turn chat re-reads
nothing), then processes the rest in chunks of `model.max_tokens`.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgert.errors import ContextError
from edgert.models.base import Transformer
from edgert.sample import Sampler, apply_repetition_penalty, make_sampler
from edgert.tokenizer import Tokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the previous call
    generation_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    time_to_first_token: float = 0.0
    peak_rss: int = 0  # bytes, process high-water mark
    # weight streaming (a model under a memory budget), over the decode steps
    streamed: bool = False
    bytes_read: int = 0  # read from disk
    io_wait_seconds: float = 0.0  # compute blocked on a read that had not finished
    read_seconds: float = 0.0  # the reader busy reading (overlaps compute)
    prompt_bytes_read: int = 0

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        # the first token comes out of prompt processing; decode speed counts the rest
        n = self.generation_tokens - 1
        return n / self.generation_seconds if n > 0 and self.generation_seconds > 0 else 0.0

    @property
    def decode_steps(self) -> int:
        return max(self.generation_tokens - 1, 0)

    def per_token(self) -> dict[str, float]:
        """Per decode step: seconds computing, seconds waiting on I/O, bytes read."""
        n = self.decode_steps or 1
        return {
            "compute_s": (self.generation_seconds - self.io_wait_seconds) / n,
            "io_wait_s": self.io_wait_seconds / n,
            "bytes_read": self.bytes_read / n,
        }


@dataclass
class GenerationResponse:
    text: str  # the new text since the previous response
    token: int
    finish_reason: str | None  # None while generating; "stop" (EOS or stop string) or "length"
    stats: Stats = field(repr=False)
    from_draft: bool = False


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


LLAMA_UBATCH = 512  # llama.cpp's default n_ubatch: it evaluates a prompt in batches of this many


class Session:
    """A model, its tokenizer, and one KV cache with the token ids it holds."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.cache = model.make_cache()
        self.tokens: list[int] = []  # ids whose K/V are in the cache, in order
        self.stats = Stats()

    @property
    def context(self) -> int:
        return self.model.context

    def reset(self) -> None:
        self.trim(len(self.tokens))

    def trim(self, n: int) -> None:
        """Forget the last n tokens (and their K/V).

        `tokens` is the truth: a forward interrupted (Ctrl-C) after the cache was written but
        before the tokens were recorded leaves stale entries past it, which this drops too.
        """
        keep = len(self.tokens) - min(n, len(self.tokens))
        for c in self.cache:
            c.trim(c.offset - keep)
        del self.tokens[keep:]

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ids to the cache (in chunks); logits of the last id, or of every id."""
        out = []
        step = self.model.max_tokens
        scratch = self.model.ws.scratch
        parity, ub = scratch.ggml_order, LLAMA_UBATCH
        s = 0
        try:
            while s < len(ids):
                e = min(s + step, len(ids))
                if parity:  # llama.cpp parity: the size of the batch llama.cpp evaluates these
                    e = min(e, (s // ub + 1) * ub)  # tokens in picks its kernels' float order;
                    scratch.ggml_batch = min(ub, len(ids) - s // ub * ub)  # no chunk spans two
                chunk = np.asarray(ids[s:e], dtype=np.int32)
                logits = self.model(chunk, self.cache, len(self.tokens), all_logits)
                self.tokens.extend(int(t) for t in chunk)
                out.append(logits.copy() if all_logits else logits)
                s = e
        finally:
            scratch.ggml_batch = 0  # a direct model call uses its own number of tokens
        return np.concatenate(out) if all_logits else out[-1][0]

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly `ids` (reusing the shared prefix); logits after the last."""
        if len(ids) >= self.context:
            raise ContextError(
                f"the prompt has {len(ids)} tokens but the context holds {self.context}; "
                f"shorten it or raise the context (-c)"
            )
        if not ids:
            raise ContextError("the prompt is empty (and the model adds no BOS token)")
        n = 0
        for a, b in zip(self.tokens, ids[:-1], strict=False):  # keep at least one token to compute
            if a != b:
                break
            n += 1
        self.trim(len(self.tokens) - n)
        self.stats.cached_tokens = n
        return self.forward(ids[n:])


def generate_step(
    session: Session,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    max_tokens: int = 256,
    repetition_penalty: float = 1.0,
    repetition_window: int = 64,
) -> Iterator[int]:
    """Yield generated token ids; stops at max_tokens or when the context is full."""
    st = session.stats
    io = session.model.io_stats  # what the model has streamed so far; None: nothing streams
    io0 = io()
    st.streamed = io0 is not None
    t0 = time.perf_counter()
    logits = session.prefill(list(prompt_ids))
    st.prompt_seconds = time.perf_counter() - t0
    if io0:
        st.prompt_bytes_read = io().bytes_read - io0.bytes_read
    history = list(prompt_ids)
    t1 = time.perf_counter()
    for i in range(max_tokens):
        if repetition_penalty != 1.0:
            logits = logits.copy()
            apply_repetition_penalty(logits, history, repetition_penalty, repetition_window)
        tok = sampler(logits)
        if i == 0:
            st.time_to_first_token = time.perf_counter() - t0
            t1 = time.perf_counter()
            io0 = io()
        st.generation_tokens = i + 1
        history.append(tok)
        yield tok
        if len(session.tokens) + 1 >= session.context or i + 1 == max_tokens:
            break
        logits = session.forward([tok])
        st.generation_seconds = time.perf_counter() - t1
        if io0:
            now = io()
            st.bytes_read = now.bytes_read - io0.bytes_read
            st.io_wait_seconds = now.wait_seconds - io0.wait_seconds
            st.read_seconds = now.read_seconds - io0.read_seconds


def stream_generate(
    session: Session,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    repetition_penalty: float = 1.0,
) -> Iterator[GenerationResponse]:
    """Yield text deltas as they decode; the last response carries finish_reason and stats."""
    tok = session.tokenizer
    ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    session.stats = st = Stats(prompt_tokens=len(ids))
    sampler = sampler or make_sampler()
    decoder = tok.stream()
    text, sent = "", 0  # all text so far, and how much of it was yielded
    hold = max((len(s) for s in stop), default=0)
    last, reason, cut = -1, "length", -1

    def find_stop() -> int:
        return min((i for s in stop if (i := text.find(s, max(0, sent - len(s)))) >= 0), default=-1)

    for t in generate_step(session, ids, sampler, max_tokens, repetition_penalty):
        last = t
        if not ignore_eos and t in tok.eos_ids:
            reason = "stop"
            break
        text += decoder.add(t)
        if (cut := find_stop()) >= 0:
            break
        # hold back a tail that could still become a stop string
        safe = len(text) - hold + 1 if hold else len(text)
        if safe > sent:
            st.peak_rss = peak_rss()
            yield GenerationResponse(text[sent:safe], t, None, st)
            sent = safe
    if cut < 0:
        text += decoder.flush()
        cut = find_stop()
    if cut >= 0:
        text, reason = text[:cut], "stop"
    st.peak_rss = peak_rss()
    yield GenerationResponse(text[sent:], last, reason, st)


def generate(session: Session, prompt: str | Sequence[int], **kw) -> str:
    return "".join(r.text for r in stream_generate(session, prompt, **kw))
