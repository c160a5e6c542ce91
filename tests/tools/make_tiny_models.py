"""Build the tiny random HF models in tests/fixtures/tiny/ and their reference logits.

Run from the repository root with the reference environment (torch + transformers):

    /work/venv-ref/bin/python tests/tools/make_tiny_models.py [--out tests/fixtures/tiny] [ARCH ...]
    /work/venv-ref/bin/python tests/tools/make_tiny_models.py --quant-refs-only [ARCH ...]

The second form leaves the committed model and reference.npz alone and only rewrites
reference-q8_0.npz / reference-q4_0.npz from them (see `write_quant_refs`).

Everything is seeded, so a rerun with the same torch/transformers/tokenizers versions reproduces
the same files. tests/fixtures/tiny/README.md describes the outputs; edgert itself never imports
this script (it needs torch).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 320
N_PROMPT = 24
N_DECODE = 8
EOS = "<|endoftext|>"
# Greedy continuations are only useful as goldens if top-1 is clearly ahead of top-2.
MIN_MARGIN = 0.05
# GGUF outtypes that get their own reference logits (reference-q8_0.npz, reference-q4_0.npz).
QUANT_OUTTYPES = ("Q8_0", "Q4_0")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

# A few KB of plain text for the byte-level BPE: prose, code, numbers, punctuation.
CORPUS = """
The small model reads one token at a time and keeps what it has seen in a cache of keys and values.
Each layer mixes the tokens with attention, then passes every position through a feed-forward block.
A router picks two experts out of four for each token; the others stay idle and cost nothing.
Memory is the budget: weights that do not fit are streamed from disk just before they are needed.
Quantized blocks hold thirty-two weights with one scale, so a 4-bit matrix is an eighth of its float size.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow.
def rmsnorm(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w
for i in range(10):
    print(i, i * i, i ** 3)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14159 2.71828 -1 +1 1e-6
user: what is the capital of France?
assistant: The capital of France is Paris.
user: and of Italy?
assistant: Rome, a city with a very long history.
It was a bright cold day in April, and the clocks were striking thirteen.
Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse,
I thought I would sail about a little and see the watery part of the world.
In the beginning the Universe was created. This has made a lot of people very angry.
Emoji and accents: cafe\u0301, naive, uber, fa\u00e7ade, \u00fcber, \u00e9t\u00e9, \u4f60\u597d, \U0001f642.
"""

PROMPT_TEXT = (
    "The small model reads one token at a time, and the router picks two experts "
    "out of four for each token in the cache."
)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    if tok.get_vocab_size() != VOCAB:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens, want {VOCAB}")
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            "0": {
                "content": EOS,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------- configs

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=None,
)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
# Wavelengths 2*pi*10000^(2i/16): 6.3 keeps its frequency (< 64/4), 20 and 63 blend, the rest
# are divided by 8 (> 64/1); the prompt's 24 positions turn those enough to change the logits.
ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def make_config(arch: str):
    if arch == "llama":
        return LlamaForCausalLM, LlamaConfig(
            **COMMON, num_hidden_layers=2, rope_parameters=ROPE, tie_word_embeddings=False
        )
    if arch == "llama3":  # Llama 3's RoPE scaling, its thresholds moved into the tiny model's range
        return LlamaForCausalLM, LlamaConfig(
            **COMMON, num_hidden_layers=2, rope_parameters=ROPE_LLAMA3, tie_word_embeddings=False
        )
    if arch == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(
            **COMMON, num_hidden_layers=2, rope_parameters=ROPE, tie_word_embeddings=True
        )
    if arch == "qwen3":
        return Qwen3ForCausalLM, Qwen3Config(
            **COMMON, num_hidden_layers=2, rope_parameters=ROPE, tie_word_embeddings=False
        )
    if arch == "gemma3":
        n_layer = 6
        # llama.cpp: layer il is sliding iff il % 6 < 5; the HF config must say exactly that.
        layer_types = ["sliding_attention" if i % 6 < 5 else "full_attention" for i in range(n_layer)]
        return Gemma3ForCausalLM, Gemma3TextConfig(
            **COMMON,
            num_hidden_layers=n_layer,
            layer_types=layer_types,
            sliding_window=8,
            query_pre_attn_scalar=16,
            # Real Gemma 3 uses 1e6 for global layers and 1e4 for local ones; keeping them
            # different here makes a swapped base show up in the logits.
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            tie_word_embeddings=True,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
    if arch == "mixtral":
        return MixtralForCausalLM, MixtralConfig(
            **COMMON,
            num_hidden_layers=2,
            rope_parameters=ROPE,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            router_jitter_noise=0.0,
            tie_word_embeddings=False,
        )
    if arch == "qwen3_moe":
        return Qwen3MoeForCausalLM, Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=2,
            rope_parameters=ROPE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            tie_word_embeddings=False,
        )
    raise SystemExit(f"unknown arch {arch!r}")


ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "mixtral", "qwen3_moe", "llama3"]


# --------------------------------------------------------------------------- weights


def init_weights(model: torch.nn.Module, arch: str, gen: torch.Generator) -> None:
    """Large enough weights that logits are far from flat; every value exactly bf16 and f16."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if "norm" in name:
                # Gemma multiplies by (1 + w), the others by w: both land near 1. Gemma's post-norms
                # get ~2 so the sublayers are not drowned by the sqrt(hidden)-scaled tied embedding
                # (which would make the greedy continuation repeat one token).
                base = 1.0
                if arch == "gemma3":
                    base = 1.0 if ".post_" in name else 0.0
                v = base + 0.1 * torch.randn(shape, generator=gen)
            elif name.endswith(".bias"):
                v = 0.1 * torch.randn(shape, generator=gen)
            elif "embed_tokens" in name or "lm_head" in name:
                v = (0.2 if arch == "gemma3" else 0.3) * torch.randn(shape, generator=gen)
            elif name.endswith("gate.weight") and p.ndim == 2 and shape[0] <= 8:
                v = 0.3 * torch.randn(shape, generator=gen)  # MoE router
            elif "down_proj" in name or "o_proj" in name or name.endswith("w2.weight"):
                v = 0.15 * torch.randn(shape, generator=gen)
            else:
                v = 0.2 * torch.randn(shape, generator=gen)
            v = v.to(torch.bfloat16).to(torch.float32)
            # bf16 values below the f16 normal range may not survive a cast to f16.
            v[v.abs() < 2.0**-14] = 0.0
            p.copy_(v)


# --------------------------------------------------------------------------- reference


@torch.no_grad()
def reference(model, prompt_ids: list[int], decode_ids: list[int] | None = None) -> dict[str, np.ndarray]:
    """Prompt logits, then N_DECODE single-token steps with the KV cache.

    The decode tokens are the greedy continuation, or `decode_ids` when given (teacher forcing).
    """
    forced = decode_ids is not None
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    prompt_logits = out.logits[0].float().numpy()
    past = out.past_key_values

    decode_ids = list(decode_ids) if forced else [int(prompt_logits[-1].argmax())]
    decode_logits = []
    for j in range(N_DECODE):
        out = model(input_ids=torch.tensor([[decode_ids[j]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float().numpy()
        decode_logits.append(logits)
        if not forced and j + 1 < N_DECODE:
            decode_ids.append(int(logits.argmax()))
    decode_logits = np.stack(decode_logits)

    # The cached steps must agree with one uncached forward over the whole sequence.
    full = torch.tensor([prompt_ids + decode_ids], dtype=torch.long)
    full_logits = model(input_ids=full, use_cache=False).logits[0].float().numpy()
    np.testing.assert_allclose(
        full_logits[N_PROMPT - 1 :], np.vstack([prompt_logits[-1:], decode_logits]), rtol=1e-4, atol=1e-4
    )

    return {
        "prompt_ids": np.asarray(prompt_ids, dtype=np.int32),
        "prompt_logits": prompt_logits.astype(np.float32),
        "decode_ids": np.asarray(decode_ids, dtype=np.int32),
        "decode_logits": decode_logits.astype(np.float32),
    }


def greedy_margin(ref: dict[str, np.ndarray]) -> float:
    rows = np.vstack([ref["prompt_logits"][-1:], ref["decode_logits"][:-1]])
    top2 = np.sort(rows, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


# --------------------------------------------------------------------------- quantized references


def _edgert_convert():
    """`edgert.convert`, imported without running edgert/__init__.py (which needs numba, absent from
    the reference venv). Only convert.py, names.py and errors.py are loaded, from this checkout."""
    if "edgert" not in sys.modules:
        pkg = types.ModuleType("edgert")
        pkg.__path__ = [str(ROOT / "edgert")]
        sys.modules["edgert"] = pkg
    return importlib.import_module("edgert.convert")


def gguf_roundtrip(src: Path, outtype: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The tensors of src/model.safetensors, each replaced by exactly what `edgert.convert` stores
    for it at `outtype`, read back as float32 in the HF layout.

    The storage type comes from convert's own `_qtype` (on the GGUF name and, for experts, the
    stacked shape), so this cannot drift from the converter. Quantized / F16 tensors get
    `dequantize(quantize(convert's transformed tensor))`, with convert's transform undone again
    (llama's q/k RoPE row permutation, exact); F32 tensors are left as they are.
    Returns the tensors and a count of tensors per storage type.
    """
    conv = _edgert_convert()
    names = importlib.import_module("edgert.names")
    hp = conv._load_hparams(src)
    out_q = conv.OUTTYPES[outtype][0]
    tensors = load_file(src / "model.safetensors")
    counts: dict[str, int] = {}
    for hf, w in tensors.items():
        name = names.gguf_name(hf, hp.arch)
        if name is None:
            continue
        shape = tuple(w.shape)
        if (stacked := names.stacked_name(name)) is not None:
            name, shape = stacked[0], (hp.n_expert, *shape)
        q = conv._qtype(name, shape, out_q)
        counts[q.name] = counts.get(q.name, 0) + 1
        if q == gguf.GGMLQuantizationType.F32:
            continue
        w = w.astype(np.float32)
        t = np.ascontiguousarray(conv._transform(hp, hf, w), dtype=np.float32)
        undo = None
        if not np.array_equal(t, w):
            m = re.search(r"self_attn\.([qk])_proj\.(weight|bias)$", hf)
            if hp.arch != "llama" or m is None:
                raise SystemExit(f"{src}: {hf} is transformed by convert and stored {q.name}; cannot undo")
            n_head = hp.n_head if m[1] == "q" else hp.n_head_kv
            undo = lambda x, n_head=n_head: conv.unpermute_rope(x, n_head)  # noqa: E731
            if not np.array_equal(undo(t), w):
                raise SystemExit(f"{src}: unpermute_rope does not invert convert's transform of {hf}")
        r = gguf.quants.dequantize(gguf.quants.quantize(t, q), q).astype(np.float32).reshape(t.shape)
        tensors[hf] = np.ascontiguousarray(undo(r) if undo is not None else r)
    return tensors, counts


def load_model(folder: Path):
    return AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()


def write_quant_refs(dst: Path) -> None:
    """reference-{q8_0,q4_0}.npz: the HF logits of the model whose weights are what the GGUF holds.

    Same prompt_ids and decode_ids as reference.npz (teacher forcing with the f32 model's greedy
    tokens), same procedure. The model is loaded from the saved folder with from_pretrained.
    """
    ref = dict(np.load(dst / "reference.npz"))
    prompt_ids = ref["prompt_ids"].tolist()
    decode_ids = ref["decode_ids"].tolist()

    # Loading path check: the saved f32 model must reproduce reference.npz.
    f32 = reference(load_model(dst), prompt_ids, decode_ids)
    for k in ("prompt_logits", "decode_logits"):
        np.testing.assert_allclose(f32[k], ref[k], rtol=0, atol=1e-5, err_msg=f"{dst.name}: reloaded f32 {k}")

    for outtype in QUANT_OUTTYPES:
        tensors, counts = gguf_roundtrip(dst, outtype)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(dst / "config.json", Path(tmp) / "config.json")
            save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            qref = reference(load_model(Path(tmp)), prompt_ids, decode_ids)
        assert np.array_equal(qref["prompt_ids"], ref["prompt_ids"])
        assert np.array_equal(qref["decode_ids"], ref["decode_ids"])
        path = dst / f"reference-{outtype.lower()}.npz"
        np.savez_compressed(path, **qref)
        dp = float(np.abs(qref["prompt_logits"] - ref["prompt_logits"]).max())
        dd = float(np.abs(qref["decode_logits"] - ref["decode_logits"]).max())
        stored = " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))
        print(
            f"{dst.name:10s} {outtype}: max|dlogit| prompt={dp:.4f} decode={dd:.4f} "
            f"(logits std {ref['prompt_logits'].std():.2f}; tensors {stored}) -> {path.name} "
            f"{path.stat().st_size} B"
        )


def build(arch: str, out_root: Path, tok: Tokenizer, prompt_ids: list[int]) -> None:
    cls, config = make_config(arch)
    config._attn_implementation = "eager"
    # Retry seeds until greedy decoding is unambiguous (top-1 clearly above top-2 at every step).
    for attempt in range(50):
        seed = 1000 * (ARCHS.index(arch) + 1) + attempt
        torch.manual_seed(seed)
        model = cls(config).float().eval()
        init_weights(model, arch, torch.Generator().manual_seed(seed))
        ref = reference(model, prompt_ids)
        if greedy_margin(ref) >= MIN_MARGIN and len(set(ref["decode_ids"].tolist())) >= N_DECODE // 2:
            break
    else:
        raise SystemExit(f"{arch}: no seed gave a varied greedy continuation with margin >= {MIN_MARGIN}")

    dst = out_root / arch
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(dst, safe_serialization=True)
    for extra in ("generation_config.json",):
        (dst / extra).unlink(missing_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    np.savez(dst / "reference.npz", **ref)
    std = float(ref["prompt_logits"].std())
    print(
        f"{arch:10s} seed={seed} logits std={std:.2f} margin={greedy_margin(ref):.3f} "
        f"decode={ref['decode_ids'].tolist()}"
    )
    write_quant_refs(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "tiny")
    ap.add_argument(
        "--quant-refs-only",
        action="store_true",
        help="only rewrite reference-q8_0.npz / reference-q4_0.npz from the existing model and reference.npz",
    )
    ap.add_argument("archs", nargs="*", default=ARCHS)
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()
    if args.quant_refs_only:
        for arch in args.archs:
            write_quant_refs(args.out / arch)
        return
    tok = train_tokenizer()
    prompt_ids = tok.encode(PROMPT_TEXT).ids
    if len(prompt_ids) < N_PROMPT:
        raise SystemExit(f"prompt is only {len(prompt_ids)} tokens, want {N_PROMPT}")
    prompt_ids = prompt_ids[:N_PROMPT]
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.archs:
        build(arch, args.out, tok, prompt_ids)


if __name__ == "__main__":
    main()
