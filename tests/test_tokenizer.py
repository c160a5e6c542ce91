"""Tokenizer and chat-template tests: llama.cpp parity on the real models (goldens recorded by
tests/tools/make_golden.py), streaming detokenization, the Jinja sandbox, and a tiny HF folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from edgert.chat_template import CHATML, GEMMA, ChatTemplateError, default_template, render_chat
from edgert.errors import FormatError, UnsupportedError
from edgert.tokenizer import Tokenizer, TokenTexts

GOLDEN = Path(__file__).parent / "golden"
KEYS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]


def gguf_metadata(path: Path) -> dict:
    """GGUF metadata as a plain dict: scalars, list[str] for string arrays, numpy for numeric arrays."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    meta = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or not field.types:
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            if field.types[1] == GGUFValueType.STRING:
                meta[field.name] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                meta[field.name] = np.concatenate([field.parts[i] for i in field.data]) if field.data else []
        elif kind == GGUFValueType.STRING:
            meta[field.name] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            meta[field.name] = field.parts[field.data[0]][0].item()
    return meta


_META: dict[str, dict] = {}


@pytest.fixture
def meta(real_model):
    def get(key: str) -> dict:
        if key not in _META:
            _META[key] = gguf_metadata(real_model(key))
        return _META[key]

    return get


def golden(kind: str, key: str) -> dict:
    return json.loads((GOLDEN / f"{kind}-{key}.json").read_text(encoding="utf-8"))


# ---- llama.cpp parity ----


@pytest.mark.parametrize("key", KEYS)
def test_ids_and_detokenization_match_llama_cpp(key, meta):
    tok = Tokenizer.from_gguf_metadata(meta(key))
    g = golden("tokenizer", key)
    assert len(g["cases"]) >= 220
    bad_ids, bad_text = [], []
    for case in g["cases"]:
        ids = tok.encode(case["text"], add_bos=False, special=True)
        if ids != case["ids"]:
            bad_ids.append((case["text"][:50], case["ids"][:12], ids[:12]))
        if tok.decode(ids) != case["detok"] or tok.decode(ids, skip_special=True) != case["detok_plain"]:
            bad_text.append((case["text"][:50], case["detok"][:50], tok.decode(ids)[:50]))
    assert not bad_ids, f"{len(bad_ids)}/{len(g['cases'])} id mismatches, first: {bad_ids[:3]}"
    assert not bad_text, f"{len(bad_text)} detokenization mismatches, first: {bad_text[:3]}"


@pytest.mark.parametrize("key", KEYS)
def test_special_tokens_match_llama_cpp(key, meta):
    tok = Tokenizer.from_gguf_metadata(meta(key))
    g = golden("tokenizer", key)
    assert tok.vocab_size == g["vocab_size"]
    assert tok.bos_id == g["bos_id"]
    assert tok.eos_id == g["eos_id"]
    assert tok.add_bos == g["add_bos"]
    assert tok.eos_ids == set(g["eog_ids"])


@pytest.mark.parametrize("key", KEYS)
def test_model_golden_prompts_tokenize_the_same(key, meta):
    tok = Tokenizer.from_gguf_metadata(meta(key))
    for prompt in golden("model", key)["prompts"]:
        assert tok.encode(prompt["text"]) == prompt["prompt_ids"], prompt["name"]


@pytest.mark.parametrize("key", KEYS)
def test_stream_decoder_equals_full_decode(key, meta):
    tok = Tokenizer.from_gguf_metadata(meta(key))
    for skip in (False, True):
        for case in golden("tokenizer", key)["cases"]:
            ids = case["ids"] + [tok.eos_id]
            stream = tok.stream(skip_special=skip)
            deltas = [stream.add(i) for i in ids]
            deltas.append(stream.flush())
            assert "".join(deltas) == tok.decode(ids, skip_special=skip), case["text"][:50]
            if "\ufffd" not in case["text"]:
                assert not any("\ufffd" in d for d in deltas), case["text"][:50]


def test_stream_holds_back_partial_utf8(meta):
    tok = Tokenizer.from_gguf_metadata(meta("gemma3-270m"))
    # byte-fallback ids for U+1F916 (4 UTF-8 bytes) arrive one byte at a time
    ids = [tok.tokens.index(f"<0x{b:02X}>") for b in "🤖".encode()]
    stream = tok.stream()
    assert [stream.add(i) for i in ids] == ["", "", "", "🤖"]
    assert stream.flush() == ""


def test_spm_tokenizes_200kb_quickly(meta):
    tok = Tokenizer.from_gguf_metadata(meta("gemma3-270m"))
    cases = golden("tokenizer", "gemma3-270m")["cases"]
    text = "\n".join(c["text"] for c in cases)
    text = (text * (200_000 // len(text) + 1))[:200_000]
    t0 = time.perf_counter()
    ids = tok.encode(text, add_bos=False)
    elapsed = time.perf_counter() - t0
    assert tok.decode(ids) == text
    assert elapsed < 10.0, f"200 KB took {elapsed:.1f} s"


def test_smollm2_tokenizer_loads_fast(meta):
    m = meta("smollm2-135m")
    best = min(_timed(lambda: Tokenizer.from_gguf_metadata(m)) for _ in range(3))
    assert best < 0.5, f"loading took {best:.3f} s"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_special_false_keeps_control_text_as_text(meta):
    tok = Tokenizer.from_gguf_metadata(meta("qwen2.5-coder-0.5b"))
    im_start = tok.tokens.index("<|im_start|>")
    assert tok.encode("<|im_start|>user")[0] == im_start
    assert im_start not in tok.encode("<|im_start|>user", special=False)
    assert tok.decode(tok.encode("<|im_start|>user", special=False)) == "<|im_start|>user"


def test_errors_are_typed():
    with pytest.raises(FormatError):
        Tokenizer.from_gguf_metadata({})
    base = {"tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(UnsupportedError, match="pre-tokenizer"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "nope"})
    with pytest.raises(UnsupportedError, match="tokenizer kind"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.model": "t5"})
    with pytest.raises(FormatError, match="merges"):
        Tokenizer.from_gguf_metadata(
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.pre": "gpt-2"}
        )


# ---- chat templates ----


@pytest.mark.parametrize("key", KEYS)
def test_chat_prompt_matches_golden(key, meta):
    m = meta(key)
    g = golden("model", key)
    chat = next(p for p in g["prompts"] if p["name"] == "chat")
    tok = Tokenizer.from_gguf_metadata(m)
    assert tok.chat_template == (GEMMA if key.startswith("gemma") else m["tokenizer.chat_template"])
    text = render_chat(
        tok.chat_template,
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        bos_token=tok.tokens[tok.bos_id],
        eos_token=tok.tokens[tok.eos_id],
    )
    assert text == chat["text"]
    assert tok.encode(text) == chat["prompt_ids"]


def test_chatml_fallback_and_gemma_template():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render_chat(None, msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(CHATML, msgs, add_generation_prompt=False).endswith("hi<|im_end|>\n")
    assert render_chat(GEMMA, msgs, bos_token="<bos>") == (
        "<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert default_template("gemma3") == GEMMA and default_template("llama") == CHATML
    with pytest.raises(ChatTemplateError, match="alternate"):
        render_chat("gemma", [{"role": "assistant", "content": "x"}])


def test_tojson_and_strftime_helpers():
    out = render_chat(
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}", [{"role": "user", "content": "é"}]
    )
    assert out == '[{"role": "user", "content": "é"}]|4'


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{% set x = messages.append(1) %}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_sandbox_refuses_python_internals(template):
    with pytest.raises(ChatTemplateError):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_bad_template_is_typed():
    with pytest.raises(ChatTemplateError, match="parse"):
        render_chat("{% for %}", [])
    with pytest.raises(ChatTemplateError, match="refused the messages"):
        render_chat("{{ raise_exception('no system role') }}", [])


# ---- Hugging Face folder ----


def test_hf_folder(tmp_path):
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HfTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, hello tokenizer",
        "naïve café 🤖",
    ] * 20
    hf.train_from_iterator(corpus, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML})
    )
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))

    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.eos_id == 2 and tok.eos_ids == {0, 2}
    assert tok.bos_id is None and not tok.add_bos
    assert tok.chat_template == CHATML
    text = "<|im_start|>user\nhello naïve 🤖 fox<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2
    assert ids == hf.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "user\nhello naïve 🤖 fox"
    assert 1 not in tok.encode(text, special=False)
    stream = tok.stream()
    assert "".join([stream.add(i) for i in ids] + [stream.flush()]) == text
    with pytest.raises(FormatError):
        Tokenizer.from_hf_folder(tmp_path / "missing")


def test_hf_folder_sentencepiece_style(tmp_path):
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HfTokenizer(models.BPE(byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    hf.decoder = decoders.Metaspace(prepend_scheme="first")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    hf.train_from_iterator(["hello world, the quick brown fox", "hello there world"] * 20, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.encode("hello")[0] == tok.bos_id == 1 and tok.eos_ids == {2}
    ids = tok.encode("hello world 🤖", add_bos=False)
    assert ids == hf.encode("hello world 🤖", add_special_tokens=False).ids
    assert tok.decode(ids) == "hello world 🤖"  # the "▁" the encoder prepends is dropped again
    stream = tok.stream()
    assert "".join([stream.add(i) for i in ids] + [stream.flush()]) == "hello world 🤖"


def test_token_texts_round_trip_every_text():
    texts = ["", "a", "Ġthe", "<|im_start|>", "你好", "🤖", "\udcff", "x\ud800y", " \t\n", "é" * 300]
    table = TokenTexts(texts)
    assert len(table) == len(texts)
    assert list(table) == texts
    assert [table[i] for i in range(-len(texts), 0)] == texts
    assert table[2:5] == texts[2:5]
    assert table.index("🤖") == 5
    with pytest.raises(IndexError):
        table[len(texts)]
    with pytest.raises(IndexError):
        table[-len(texts) - 1]
