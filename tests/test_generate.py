"""Generation and the Python API: streaming, stop conditions, sampling, chat, statistics."""

from __future__ import annotations

import pytest
from conftest import TINY

import edgert
from edgert.errors import ContextError


@pytest.fixture(scope="module")
def tiny():
    return edgert.load(TINY / "llama", context=64)


@pytest.fixture(scope="module")
def smol(real_model):
    return edgert.load(real_model("smollm2-135m"), context=1024)


def test_stream_joins_to_generate(tiny):
    full = tiny.generate("hello world", max_tokens=12, ignore_eos=True)
    parts = list(tiny.stream("hello world", max_tokens=12, ignore_eos=True))
    assert "".join(p.text for p in parts) == full
    assert parts[-1].finish_reason == "length" and all(p.finish_reason is None for p in parts[:-1])
    assert tiny.stats.generation_tokens == 12


def test_max_tokens_and_context_limit(tiny):
    ids = tiny.tokenize("hello world " * 4)
    r = list(tiny.stream(ids, max_tokens=500, ignore_eos=True))
    assert r[-1].finish_reason == "length"
    assert tiny.stats.prompt_tokens + tiny.stats.generation_tokens <= 64  # never past the context
    with pytest.raises(ContextError, match="context"):
        tiny.generate("hello " * 100)


def test_stop_strings(tiny):
    full = tiny.generate("hello world", max_tokens=16, ignore_eos=True)
    stop = full[3:6]
    assert stop and stop in full
    out = tiny.generate("hello world", max_tokens=16, ignore_eos=True, stop=[stop])
    assert out == full[: full.index(stop)]
    last = list(tiny.stream("hello world", max_tokens=16, ignore_eos=True, stop=[stop]))[-1]
    assert last.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(tiny):
    opts = dict(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, ignore_eos=True)
    a = tiny.generate("hello", seed=5, **opts)
    assert a == tiny.generate("hello", seed=5, **opts)
    assert len({tiny.generate("hello", seed=s, **opts) for s in range(6)}) > 1


def test_repetition_penalty_changes_greedy_output(tiny):
    plain = tiny.generate("hello", max_tokens=16, ignore_eos=True)
    penalised = tiny.generate("hello", max_tokens=16, ignore_eos=True, repetition_penalty=2.0)
    assert plain != penalised


def test_real_model_api(smol):
    ids = smol.tokenize("The capital of France is")
    assert smol.detokenize(ids) == "The capital of France is"
    text = smol.generate("The capital of France is", max_tokens=8)
    assert "Paris" in text
    st = smol.stats
    assert st.prompt_tokens == len(ids) and st.generation_tokens >= 1
    assert st.prompt_tps > 0 and st.time_to_first_token > 0 and st.peak_rss > 50 << 20


def test_real_model_chat_and_eos(smol):
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = smol.chat_prompt(msgs)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    r = list(smol.stream_chat(msgs, max_tokens=64))
    answer = "".join(x.text for x in r)
    assert "Paris" in answer and r[-1].finish_reason == "stop"  # ended by <|im_end|>
    # the next turn reuses the cached conversation
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    smol.chat(msgs, max_tokens=16)
    assert smol.stats.cached_tokens > len(smol.tokenize(prompt)) // 2


def test_real_model_stream_is_utf8_clean(smol):
    out = smol.generate("Écris une phrase en français avec des accents:", max_tokens=24, ignore_eos=True)
    assert "\ufffd" not in out and len(out) > 20


@pytest.mark.parametrize("kv_bits", [16, 4])
def test_decoding_allocates_no_buffers(real_model, smol, kv_bits):
    """A decode step writes into preallocated scratch: over 64 steps the traced heap may grow by
    the token ids the session keeps and a few Python objects, never by an array's worth (one
    row of activations is 2.3 KiB, the logits 192 KiB). The 4-bit cache quantizes its first key
    group (80 positions waiting) during the warm-up, which loads that kernel, and its second
    inside the measured steps."""
    import tracemalloc

    from edgert.generate import generate_step
    from edgert.sample import make_sampler

    llm = smol if kv_bits == 16 else edgert.load(real_model("smollm2-135m"), context=256, kv_bits=4)
    prompt = llm.tokenize("The history of the printing press, told year by year. " * 6)[:64]
    steps = generate_step(llm.session, prompt, make_sampler(), 100)
    for _ in range(24):  # past the prompt and the first uses of the kernels
        next(steps)
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(64):
            next(steps)
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - start < 16 << 10, f"decoding allocated: peak {peak - start} B over 64 steps"
    assert end - start < 8 << 10
