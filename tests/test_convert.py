"""edgert.convert and edgert.names against the tiny HF fixtures, read back with gguf-py."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgert.convert import convert, permute_rope, unpermute_rope
from edgert.errors import FormatError, UnsupportedError
from edgert.names import gguf_name, stacked_name

TINY = Path(__file__).parent / "fixtures" / "tiny"
ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "mixtral", "qwen3_moe"]
GGUF_ARCH = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "mixtral": "llama",
    "qwen3_moe": "qwen3moe",
}
Q = gguf.GGMLQuantizationType


def _config(arch: str) -> dict:
    return json.loads((TINY / arch / "config.json").read_text())


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _expected(arch: str) -> dict[str, np.ndarray]:
    """What the GGUF must hold, derived from the safetensors with the documented transforms."""
    cfg = _config(arch)
    ga = GGUF_ARCH[arch]
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for hf, w in load_file(TINY / arch / "model.safetensors").items():
        name = gguf_name(hf, ga)
        if name is None:
            continue
        if ga == "llama" and name.startswith("blk.") and ".attn_q." in name:
            w = permute_rope(w, cfg["num_attention_heads"])
        if ga == "llama" and name.startswith("blk.") and ".attn_k." in name:
            w = permute_rope(w, cfg["num_key_value_heads"])
        if ga == "gemma3" and name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        if (st := stacked_name(name)) is not None:
            experts.setdefault(st[0], {})[st[1]] = w
        else:
            out[name] = w
    for name, by_e in experts.items():
        out[name] = np.stack([by_e[e] for e in sorted(by_e)])
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[tuple[str, str], gguf.GGUFReader]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        (arch, q): gguf.GGUFReader(convert(TINY / arch, root / f"{arch}-{q}.gguf", q))
        for arch in ARCHS
        for q in ("F32", "Q8_0", "Q4_0")
    }


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_matches_config(converted, arch):
    cfg = _config(arch)
    f = _fields(converted[(arch, "Q8_0")])
    a = GGUF_ARCH[arch]
    assert f["general.architecture"] == a
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f[f"{a}.block_count"] == cfg["num_hidden_layers"]
    assert f[f"{a}.context_length"] == cfg["max_position_embeddings"]
    assert f[f"{a}.embedding_length"] == cfg["hidden_size"]
    assert f[f"{a}.feed_forward_length"] == cfg["intermediate_size"]
    assert f[f"{a}.attention.head_count"] == cfg["num_attention_heads"]
    assert f[f"{a}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f[f"{a}.attention.key_length"] == cfg["head_dim"]
    assert f[f"{a}.attention.value_length"] == cfg["head_dim"]
    assert f[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    rope = cfg["rope_parameters"]
    if arch == "gemma3":
        assert f["gemma3.rope.freq_base"] == rope["full_attention"]["rope_theta"]
        assert f["gemma3.rope.freq_base_swa"] == rope["sliding_attention"]["rope_theta"]
        assert f["gemma3.attention.sliding_window"] == cfg["sliding_window"]
    else:
        assert f[f"{a}.rope.freq_base"] == rope["rope_theta"]
    if a == "llama":
        assert f["llama.vocab_size"] == cfg["vocab_size"]
        assert f["llama.rope.dimension_count"] == cfg["head_dim"]
    if arch in ("mixtral", "qwen3_moe"):
        assert f[f"{a}.expert_count"] == 4
        assert f[f"{a}.expert_used_count"] == cfg["num_experts_per_tok"]
    if arch == "qwen3_moe":
        assert f["qwen3moe.expert_feed_forward_length"] == cfg["moe_intermediate_size"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tokenizer_metadata(converted, arch):
    f = _fields(converted[(arch, "F32")])
    tj = json.loads((TINY / arch / "tokenizer.json").read_text())
    tc = json.loads((TINY / arch / "tokenizer_config.json").read_text())
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "default"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == _config(arch)["vocab_size"]
    for tok, i in tj["model"]["vocab"].items():
        assert tokens[i] == tok
    assert tokens[0] == "<|endoftext|>"
    assert f["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.token_type"][1] == gguf.TokenType.NORMAL
    assert len(f["tokenizer.ggml.merges"]) == len(tj["model"]["merges"])
    assert f["tokenizer.ggml.bos_token_id"] == 0
    assert f["tokenizer.ggml.eos_token_id"] == 0
    assert f["tokenizer.chat_template"] == tc["chat_template"]


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_tensors_equal_safetensors(converted, arch):
    want = _expected(arch)
    got = {t.name: t for t in converted[(arch, "F32")].tensors}
    assert set(got) == set(want)
    if _config(arch)["tie_word_embeddings"]:
        assert "output.weight" not in got
    for name, w in want.items():
        t = got[name]
        assert t.tensor_type == Q.F32, name
        assert tuple(int(n) for n in reversed(t.shape)) == w.shape, name  # GGUF dims are reversed
        np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w, err_msg=name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("outtype", ["Q8_0", "Q4_0"])
def test_quantized_tensors_are_the_gguf_py_blocks(converted, arch, outtype):
    want = _expected(arch)
    q = Q[outtype]
    for t in converted[(arch, outtype)].tensors:
        w = want[t.name]
        f32 = w.ndim == 1 or t.name.endswith("_norm.weight") or ".ffn_gate_inp." in t.name
        f32 = f32 or not t.name.endswith(".weight")
        assert t.tensor_type == (Q.F32 if f32 else q), t.name
        assert tuple(int(n) for n in reversed(t.shape)) == w.shape, t.name
        np.testing.assert_array_equal(
            np.asarray(t.data).reshape(-1), gguf.quants.quantize(w, t.tensor_type).reshape(-1), err_msg=t.name
        )
        if not f32:  # and the blocks decode to something close to the weights
            back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
            assert np.abs(back - w).max() <= (0.02 if outtype == "Q8_0" else 0.2) * np.abs(w).max()


def test_moe_experts_are_stacked(converted):
    t = {t.name: t for t in converted[("mixtral", "F32")].tensors}
    # numpy [n_expert, n_ff, n_embd] -> ggml ne {n_embd, n_ff, n_expert}
    assert [int(n) for n in t["blk.0.ffn_gate_exps.weight"].shape] == [64, 128, 4]
    assert [int(n) for n in t["blk.0.ffn_down_exps.weight"].shape] == [128, 64, 4]
    w1 = load_file(TINY / "mixtral" / "model.safetensors")[
        "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    ]
    np.testing.assert_array_equal(np.asarray(t["blk.0.ffn_gate_exps.weight"].data)[2], w1)


# --------------------------------------------------------------------------- rope permutation


def test_permute_rope_maps_rotate_half_to_interleaved():
    rng = np.random.default_rng(0)
    n_head, d, n_in = 2, 8, 5
    w = rng.standard_normal((n_head * d, n_in)).astype(np.float32)
    x = rng.standard_normal(n_in).astype(np.float32)
    theta = rng.uniform(0, 3, d // 2)
    cos, sin = np.cos(theta), np.sin(theta)

    # HF: pairs are (j, j + d/2) within each head.
    q = (w @ x).reshape(n_head, d)
    lo, hi = q[:, : d // 2], q[:, d // 2 :]
    hf = np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=1)

    # GGUF (llama.cpp "normal" rope): pairs are (2j, 2j+1) of the permuted rows.
    qp = (permute_rope(w, n_head) @ x).reshape(n_head, d // 2, 2)
    a, b = qp[..., 0], qp[..., 1]
    gg = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(n_head, d)

    np.testing.assert_allclose(unpermute_rope(gg.reshape(-1, 1), n_head).reshape(n_head, d), hf, rtol=1e-6)
    np.testing.assert_array_equal(unpermute_rope(permute_rope(w, n_head), n_head), w)


# --------------------------------------------------------------------------- other inputs


def _save_bf16(tensors: dict[str, np.ndarray], path: Path) -> None:
    """A BF16 safetensors file (numpy has no bfloat16, so write the format by hand)."""
    header, blobs, off = {}, [], 0
    for name, w in tensors.items():
        raw = (np.ascontiguousarray(w, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(w.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _copy_model(arch: str, dst: Path) -> Path:
    shutil.copytree(TINY / arch, dst, ignore=shutil.ignore_patterns("model.safetensors", "reference.npz"))
    return dst


def test_bf16_checkpoint_converts_exactly(tmp_path):
    src = _copy_model("llama", tmp_path / "llama-bf16")
    _save_bf16(load_file(TINY / "llama" / "model.safetensors"), src / "model.safetensors")
    got = {
        t.name: np.asarray(t.data) for t in gguf.GGUFReader(convert(src, tmp_path / "m.gguf", "F32")).tensors
    }
    for name, w in _expected("llama").items():
        np.testing.assert_array_equal(got[name].reshape(w.shape), w, err_msg=name)


def test_fused_gate_up_experts(tmp_path):
    """transformers-5 style fused experts convert to the same GGUF tensors as per-expert ones."""
    tensors = load_file(TINY / "qwen3_moe" / "model.safetensors")
    fused = {}
    for name, w in tensors.items():
        if ".mlp.experts." not in name:
            fused[name] = w
    for i in range(_config("qwen3_moe")["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        gate = np.stack([tensors[f"{p}.{e}.gate_proj.weight"] for e in range(4)])
        up = np.stack([tensors[f"{p}.{e}.up_proj.weight"] for e in range(4)])
        fused[f"{p}.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        fused[f"{p}.down_proj"] = np.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(4)])
    src = _copy_model("qwen3_moe", tmp_path / "fused")
    save_file(fused, str(src / "model.safetensors"))
    got = {
        t.name: np.asarray(t.data) for t in gguf.GGUFReader(convert(src, tmp_path / "m.gguf", "F32")).tensors
    }
    want = _expected("qwen3_moe")
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name].reshape(w.shape), w, err_msg=name)


def test_progress_and_other_outtypes(tmp_path):
    calls = []
    for q in ("F16", "BF16", "Q4_1", "Q5_0"):
        calls.clear()
        r = gguf.GGUFReader(
            convert(TINY / "qwen2", tmp_path / f"{q}.gguf", q, progress=lambda d, n: calls.append((d, n)))
        )
        assert calls[-1] == (len(r.tensors), len(r.tensors))
        assert [d for d, _ in calls] == list(range(1, len(r.tensors) + 1))
        assert {t.tensor_type for t in r.tensors} == {Q.F32, Q[q]}


def test_rows_not_multiple_of_block_fall_back_to_f16(tmp_path):
    src = _copy_model("llama", tmp_path / "odd")
    tensors = load_file(TINY / "llama" / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 120  # down_proj rows are 120 long: not a multiple of 32
    (src / "config.json").write_text(json.dumps(cfg))
    for i in range(cfg["num_hidden_layers"]):
        for k in ("gate_proj", "up_proj"):
            tensors[f"model.layers.{i}.mlp.{k}.weight"] = tensors[f"model.layers.{i}.mlp.{k}.weight"][:120]
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = tensors[f"model.layers.{i}.mlp.down_proj.weight"][
            :, :120
        ]
    save_file(tensors, str(src / "model.safetensors"))
    t = {t.name: t for t in gguf.GGUFReader(convert(src, tmp_path / "m.gguf", "Q4_0")).tensors}
    assert t["blk.0.ffn_down.weight"].tensor_type == Q.F16
    assert t["blk.0.ffn_up.weight"].tensor_type == Q.Q4_0


# --------------------------------------------------------------------------- errors


def test_missing_config(tmp_path):
    with pytest.raises(FormatError, match="config.json"):
        convert(tmp_path, tmp_path / "x.gguf")


def test_not_a_directory(tmp_path):
    with pytest.raises(FormatError, match="not a directory"):
        convert(tmp_path / "nope", tmp_path / "x.gguf")


def test_unknown_model_type(tmp_path):
    src = _copy_model("llama", tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="gpt_neox"):
        convert(src, tmp_path / "x.gguf")


def test_unknown_outtype():
    with pytest.raises(UnsupportedError, match="Q3_K"):
        convert(TINY / "llama", "/nonexistent/x.gguf", "Q3_K")


def test_missing_tensor(tmp_path):
    src = _copy_model("qwen3", tmp_path / "m")
    tensors = load_file(TINY / "qwen3" / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(FormatError, match=r"blk\.1\.attn_k_norm\.weight"):
        convert(src, tmp_path / "x.gguf")


def test_missing_expert(tmp_path):
    src = _copy_model("mixtral", tmp_path / "m")
    tensors = load_file(TINY / "mixtral" / "model.safetensors")
    del tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(FormatError, match=r"ffn_down_exps.*\[3\]"):
        convert(src, tmp_path / "x.gguf")


def test_missing_weights_and_tokenizer(tmp_path):
    src = _copy_model("llama", tmp_path / "m")
    with pytest.raises(FormatError, match="safetensors"):
        convert(src, tmp_path / "x.gguf")
    shutil.copy(TINY / "llama" / "model.safetensors", src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match="tokenizer.json"):
        convert(src, tmp_path / "x.gguf")


# --------------------------------------------------------------------------- names


def test_names_table():
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert gguf_name("model.layers.7.self_attn.q_proj.bias") == "blk.7.attn_q.bias"
    assert gguf_name("model.layers.2.post_attention_layernorm.weight") == "blk.2.ffn_norm.weight"
    assert (
        gguf_name("model.layers.2.post_attention_layernorm.weight", "gemma3")
        == "blk.2.post_attention_norm.weight"
    )
    assert gguf_name("model.layers.2.pre_feedforward_layernorm.weight", "gemma3") == "blk.2.ffn_norm.weight"
    assert gguf_name("model.layers.1.block_sparse_moe.experts.3.w2.weight") == "blk.1.ffn_down.3.weight"
    assert gguf_name("model.layers.1.mlp.experts.0.up_proj.weight") == "blk.1.ffn_up.0.weight"
    assert stacked_name("blk.1.ffn_down.3.weight") == ("blk.1.ffn_down_exps.weight", 3)
    assert stacked_name("blk.1.ffn_down.weight") is None
    with pytest.raises(KeyError):
        gguf_name("model.layers.0.mystery.weight")
