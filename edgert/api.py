"""The in-process API: `load` a model once, then generate, stream, chat and tokenize."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numba

from edgert import loader
from edgert.generate import GenerationResponse, Session, Stats, stream_generate
from edgert.sample import make_sampler


class LLM:
    """A loaded model with one conversation's KV cache. Not thread-safe: one call at a time."""

    def __init__(
        self,
        source: loader.ModelSource,
        context: int | None = None,
        max_tokens: int = 64,
        memory_budget: str | int | None = None,
        profile: str | None = None,
        kv_bits: int = 16,
        cache_dir: Path | None = None,
        pack_stream: bool = True,
        progress=None,
        llama_parity: bool = False,
    ):
        self.source = source
        self.model = loader.build(
            source,
            context,
            max_tokens,
            memory_budget,
            profile,
            cache_dir=cache_dir,
            pack_stream=pack_stream,
            progress=progress,
            kv_bits=kv_bits,
            llama_parity=llama_parity,
        )
        self.tokenizer = source.tokenizer
        self.session = Session(self.model, self.tokenizer)

    @property
    def args(self):
        return self.source.args

    @property
    def stats(self) -> Stats:
        """Statistics of the last call: token counts, prompt and decode tok/s, TTFT, peak RSS."""
        return self.session.stats

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
    ) -> Iterator[GenerationResponse]:
        """Stream a completion of `prompt` (text, or token ids used as they are).

        Raises:
            ContextError: the prompt does not fit the context.
        """
        sampler = make_sampler(temperature, top_k, top_p, min_p, seed)
        yield from stream_generate(
            self.session, prompt, max_tokens, sampler, stop, ignore_eos, repetition_penalty
        )

    def generate(self, prompt: str | Sequence[int], **opts) -> str:
        """The completion of `prompt` as one string; options as for `stream`."""
        return "".join(r.text for r in self.stream(prompt, **opts))

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        from edgert.chat_template import render_chat

        t = self.tokenizer
        bos = t.tokens[t.bos_id] if t.bos_id is not None else ""
        eos = t.tokens[t.eos_id] if t.eos_id is not None else ""
        return render_chat(t.chat_template, messages, add_generation_prompt, bos_token=bos, eos_token=eos)

    def stream_chat(self, messages: Sequence[dict], **opts) -> Iterator[GenerationResponse]:
        """Stream the assistant's answer to `messages` ([{"role": ..., "content": ...}, ...])."""
        prompt = self.tokenize(self.chat_prompt(messages), add_bos=None, special=True)
        yield from self.stream(prompt, **opts)

    def chat(self, messages: Sequence[dict], **opts) -> str:
        return "".join(r.text for r in self.stream_chat(messages, **opts))

    def reset(self) -> None:
        self.session.reset()

    def close(self) -> None:
        """Stop the weight streamer's reader thread and close the model's files."""
        self.model.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def set_threads(threads: int | None) -> None:
    """Compute threads for the kernels (None: all cores numba was started with)."""
    if threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def load(
    model: str | Path = "smollm2-135m",
    context: int | None = 4096,
    threads: int | None = None,
    cache_dir: Path | None = None,
    progress=None,
    max_tokens: int = 64,
    memory_budget: str | int | None = None,
    profile: str | None = None,
    kv_bits: int = 16,
    pack_stream: bool = True,
    llama_parity: bool = False,
) -> LLM:
    """Load a model: a .gguf file, an HF safetensors folder, or a known name (pulled on first use).

    Args:
        context: the KV cache's length in tokens (capped at the model's trained context).
        threads: compute threads (default: all cores).
        max_tokens: prompt tokens per forward chunk.
        memory_budget: everything the process may hold ("1.5GiB", "800MB", bytes); weights
            that do not fit stream from disk through a prefetch window. None: all resident.
        profile: the device profile the memory plan predicts speed from (a shipped name or a
            TOML path; default: this host's measured one, else laptop-8gb).
        kv_bits: KV cache precision: 16 (fp16), 8 (per token) or 4 (KIVI: keys per channel).
        cache_dir: where pulled models and the packed stream file go (default ~/.cache/edgert).
        progress: called as progress(what, done, total) while pulling or packing.
        pack_stream: streamed weights are read from a packed copy in the cache, written on
            first use, so they run on the fast kernels; False reads the model file's blocks.
        llama_parity: sum matmuls and fp16 attention in llama.cpp's float orders too (as it
            picks them by batch size), so that models of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q6_K
            blocks compute llama.cpp's activations bit for bit (x86, AVX-512 VNNI); prompts run
            at about 0.4x and decoding at about 0.8x the default speed.
    Raises:
        FormatError, UnsupportedError, ModelNotFoundError, DownloadError, OptionError (kv_bits);
        BudgetError when the budget is below the minimum working set (the message gives it);
        CacheError when the packed stream file cannot be written.
    """
    set_threads(threads)
    path = loader.resolve(model, cache_dir, progress)
    return LLM(
        loader.open_source(path),
        context,
        max_tokens,
        memory_budget,
        profile,
        kv_bits,
        cache_dir=cache_dir,
        pack_stream=pack_stream,
        progress=progress,
        llama_parity=llama_parity,
    )
