"""Convert a Hugging Face safetensors folder into a GGUF file that llama.cpp can read.

The conventions follow llama.cpp's ``convert_hf_to_gguf.py`` (architecture strings, metadata
keys, tensor names, per-architecture weight transforms, which tensors stay F32), so the result
loads in llama.cpp as well as in edgert. Tensors are read through mmap and written one at a
time, so a model larger than RAM converts in bounded memory.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgert.errors import FormatError, UnsupportedError
from edgert.names import gguf_name, stacked_name
from edgert.rope import llama3_factors

# HF model_type -> GGUF architecture string (llama.cpp MODEL_ARCH_NAMES).
ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
OUTTYPES: dict[str, tuple[Q, FT]] = {
    "F32": (Q.F32, FT.ALL_F32),
    "F16": (Q.F16, FT.MOSTLY_F16),
    "BF16": (Q.BF16, FT.MOSTLY_BF16),
    "Q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0),
    "Q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0),
    "Q4_1": (Q.Q4_1, FT.MOSTLY_Q4_1),
    "Q5_0": (Q.Q5_0, FT.MOSTLY_Q5_0),
}

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


# --------------------------------------------------------------------------- safetensors


class _SafeTensors:
    """Read-only, mmap-backed view of one or more .safetensors files (handles BF16 without torch)."""

    def __init__(self, files: list[Path]):
        self._maps: list[mmap.mmap] = []
        self.index: dict[str, tuple[mmap.mmap, str, tuple[int, ...], int, int]] = {}
        for path in files:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{path} is not a safetensors file (shorter than its header)")
                (n,) = struct.unpack("<Q", head)
                try:
                    header = json.loads(f.read(n))
                except ValueError as e:
                    raise FormatError(f"{path} has a corrupt safetensors header: {e}") from None
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(mm)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _ST_DTYPES:
                    raise UnsupportedError(
                        f"{path}: tensor {name} has dtype {info['dtype']}; "
                        f"edgert converts {sorted(_ST_DTYPES)}"
                    )
                lo, hi = info["data_offsets"]
                self.index[name] = (mm, info["dtype"], tuple(info["shape"]), 8 + n + lo, 8 + n + hi)

    def names(self) -> list[str]:
        return list(self.index)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.index[name][2]

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (a copy: the mmap stays read-only)."""
        mm, dtype, shape, lo, hi = self.index[name]
        raw = np.frombuffer(mm, dtype=_ST_DTYPES[dtype], count=math.prod(shape), offset=lo).reshape(shape)
        if dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    def close(self) -> None:
        for mm in self._maps:
            mm.close()


def _safetensors_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({src / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FormatError(f"{index} lists shards that are missing: {missing}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FormatError(f"no .safetensors files in {src}; edgert converts safetensors checkpoints only")
    return files


# --------------------------------------------------------------------------- hparams


@dataclass(frozen=True)
class _HParams:
    arch: str  # GGUF architecture
    model_type: str  # HF model_type
    raw: dict

    def get(self, *keys: str, default=None):
        for k in keys:
            if self.raw.get(k) is not None:
                return self.raw[k]
        return default

    def need(self, *keys: str):
        v = self.get(*keys)
        if v is None:
            raise FormatError(f"config.json lacks {' / '.join(keys)}, which a {self.model_type} model needs")
        return v

    @property
    def n_layer(self) -> int:
        return int(self.need("num_hidden_layers"))

    @property
    def n_head(self) -> int:
        return int(self.need("num_attention_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", default=self.n_head))

    @property
    def n_expert(self) -> int:
        return int(self.get("num_local_experts", "num_experts", default=0))

    @property
    def rope(self) -> dict:
        """Rope parameters of global (full-attention) layers: transformers 5 `rope_parameters`,
        older `rope_scaling` + `rope_theta`."""
        rp = self.get("rope_parameters", "rope_scaling", default={}) or {}
        rp = dict(rp.get("full_attention", rp))
        if "rope_theta" not in rp and self.get("rope_theta") is not None:
            rp["rope_theta"] = self.raw["rope_theta"]
        if "rope_type" not in rp and "type" in rp:
            rp["rope_type"] = rp["type"]
        return rp

    @property
    def rope_theta_swa(self) -> float | None:
        rp = self.get("rope_parameters", default={}) or {}
        if "sliding_attention" in rp:
            return rp["sliding_attention"].get("rope_theta")
        return self.get("rope_local_base_freq")


def _load_hparams(src: Path) -> _HParams:
    cfg_path = src / "config.json"
    if not src.is_dir():
        raise FormatError(f"{src} is not a directory; pass the folder of an HF checkpoint")
    if not cfg_path.is_file():
        raise FormatError(f"{src} has no config.json; pass the folder of an HF checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise FormatError(f"{cfg_path} is not valid JSON: {e}") from None
    if "text_config" in cfg:  # multimodal checkpoints: convert the text model
        cfg = {**cfg, **cfg["text_config"]}
    model_type = cfg.get("model_type")
    if model_type not in ARCH:
        raise UnsupportedError(
            f"{cfg_path}: model_type {model_type!r} is not supported; edgert converts {sorted(ARCH)}"
        )
    return _HParams(arch=ARCH[model_type], model_type=model_type, raw=cfg)


# --------------------------------------------------------------------------- transforms


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> GGUF interleaved pairs (llama.cpp ``LlamaModel.permute``).

    Within each head, HF row j (j < d/2) and row j + d/2 form a rotation pair; GGUF puts them at
    rows 2j and 2j+1. Works on weights [n_head*d, n_in] and biases [n_head*d].
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rope` (GGUF interleaved -> HF rotate-half)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _transform(hp: _HParams, hf_name: str, data: np.ndarray) -> np.ndarray:
    """Per-architecture fix-ups applied to one HF tensor (see edgert/names.py for the list)."""
    if hp.arch == "llama":
        if re.search(r"self_attn\.q_proj\.(weight|bias)$", hf_name):
            data = permute_rope(data, hp.n_head)
        elif re.search(r"self_attn\.k_proj\.(weight|bias)$", hf_name):
            data = permute_rope(data, hp.n_head_kv)
    if hp.arch == "gemma3" and hf_name.endswith("norm.weight"):
        data = data + np.float32(1.0)  # HF Gemma3RMSNorm scales by (1 + w); GGUF stores w + 1
    return data


# A planned output tensor: its GGUF name, logical numpy shape and how to produce float32 data.
@dataclass
class _Out:
    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def _plan(hp: _HParams, st: _SafeTensors) -> list[_Out]:
    """Every tensor to write, in file order, with experts stacked and fused tensors split."""
    tied = hp.get("tie_word_embeddings") is True
    singles: dict[str, _Out] = {}
    experts: dict[str, dict[int, str]] = {}  # stacked name -> {expert: hf name}

    for hf in st.names():
        if hf.startswith(
            ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
        ):
            continue
        try:
            name = gguf_name(hf, hp.arch)
        except KeyError:
            raise UnsupportedError(
                f"tensor {hf!r} of this {hp.model_type} checkpoint has no GGUF name in edgert/names.py"
            ) from None
        if name is None or (name == "output.weight" and tied):
            continue
        if (st_name := stacked_name(name)) is not None:
            experts.setdefault(st_name[0], {})[st_name[1]] = hf
        elif name.endswith("ffn_gate_up_exps.weight"):
            for part, out in _split_gate_up(hp, st, hf, name):
                singles[part] = out
        elif name.endswith("ffn_down_exps.weight") and len(st.shape(hf)) == 3:
            singles[name] = _Out(name, st.shape(hf), lambda hf=hf: st.get(hf))
        else:
            singles[name] = _Out(name, st.shape(hf), lambda hf=hf: _transform(hp, hf, st.get(hf)))

    for name, by_expert in experts.items():
        n = hp.n_expert or len(by_expert)
        if sorted(by_expert) != list(range(n)):
            missing = sorted(set(range(n)) - set(by_expert))
            raise FormatError(f"{name}: experts {missing} are missing from the checkpoint")
        hfs = [by_expert[e] for e in range(n)]
        shape = (n, *st.shape(hfs[0]))
        singles[name] = _Out(name, shape, lambda hfs=hfs: np.stack([st.get(h) for h in hfs]))

    _check_complete(hp, singles, tied)
    if hp.arch == "llama" and hp.rope.get("rope_type", "").lower() == "llama3":
        singles["rope_freqs.weight"] = _llama3_rope_freqs(hp)
    return sorted(singles.values(), key=lambda o: _order(o.name))


def _split_gate_up(hp: _HParams, st: _SafeTensors, hf: str, name: str):
    """Fused [n_expert, 2*n_ff, n_embd] (gate rows first) -> ffn_gate_exps and ffn_up_exps."""
    e, a, b = st.shape(hf)
    n_embd = int(hp.need("hidden_size"))
    if b == n_embd and a % 2 == 0:
        transpose = False
    elif a == n_embd and b % 2 == 0:  # [n_expert, n_embd, 2*n_ff] (older fused layout)
        transpose = True
    else:
        raise UnsupportedError(f"{hf}: fused gate_up shape {(e, a, b)} does not fit hidden_size {n_embd}")
    n_ff = (b if transpose else a) // 2

    def half(k: int) -> np.ndarray:
        w = st.get(hf)
        w = w.transpose(0, 2, 1) if transpose else w
        return np.ascontiguousarray(w[:, k * n_ff : (k + 1) * n_ff, :])

    gate, up = name.replace("gate_up", "gate"), name.replace("gate_up", "up")
    return [
        (gate, _Out(gate, (e, n_ff, n_embd), lambda: half(0))),
        (up, _Out(up, (e, n_ff, n_embd), lambda: half(1))),
    ]


def _llama3_rope_freqs(hp: _HParams) -> _Out:
    rp = hp.rope
    dim = int(hp.get("head_dim", default=int(hp.need("hidden_size")) // hp.n_head))
    base = float(rp.get("rope_theta", 10000.0))
    return _Out("rope_freqs.weight", (dim // 2,), lambda: llama3_factors(rp, dim, base))


def _check_complete(hp: _HParams, have: dict[str, _Out], tied: bool) -> None:
    want = ["token_embd.weight", "output_norm.weight"]
    if hp.get("tie_word_embeddings") is False:
        want.append("output.weight")
    moe = hp.n_expert > 0
    for i in range(hp.n_layer):
        b = f"blk.{i}."
        want += [
            b + t + ".weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")
        ]
        if hp.arch == "qwen2":
            want += [b + t + ".bias" for t in ("attn_q", "attn_k", "attn_v")]
        if hp.arch in ("qwen3", "qwen3moe", "gemma3"):
            want += [b + "attn_q_norm.weight", b + "attn_k_norm.weight"]
        if hp.arch == "gemma3":
            want += [b + "post_attention_norm.weight", b + "post_ffw_norm.weight"]
        ffn = (
            ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp")
            if moe
            else ("ffn_gate", "ffn_up", "ffn_down")
        )
        want += [b + t + ".weight" for t in ffn]
    missing = [w for w in want if w not in have]
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise FormatError(f"the checkpoint lacks tensors a {hp.model_type} model needs: {missing[:8]}{more}")


def _order(name: str) -> tuple:
    # llama.cpp's order: embeddings, then blocks in layer order, then output norm and head.
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1, int(m[1]), name)
    return (0 if name.startswith(("token_embd", "rope_freqs")) else 2, 0, name)


def _qtype(name: str, shape: tuple[int, ...], outtype: Q) -> Q:
    """Storage type of one tensor, as llama.cpp's ``prepare_tensors`` decides it."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32  # 1-D tensors and norms: llama.cpp's kernels expect F32
    if ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return Q.F32  # routers and non-weight tensors stay F32
    block = gguf.GGML_QUANT_SIZES[outtype][0]
    if shape[-1] % block != 0:
        return Q.F16  # rows that do not split into blocks: llama.cpp falls back to F16
    return outtype


# --------------------------------------------------------------------------- metadata


def _add_hparams(w: gguf.GGUFWriter, hp: _HParams, ftype: FT) -> None:
    """Model metadata under ``{arch}.*``, the same keys llama.cpp's converter writes."""
    n_embd = int(hp.need("hidden_size"))
    w.add_block_count(hp.n_layer)
    ctx = hp.get("max_position_embeddings", default=131072 if hp.arch == "gemma3" else None)
    if ctx is not None:
        w.add_context_length(int(ctx))
    w.add_embedding_length(n_embd)
    if (n_ff := hp.get("intermediate_size")) is not None:
        w.add_feed_forward_length(int(n_ff))
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)

    rope = hp.rope
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):
        raise UnsupportedError(f"rope type {rope_type!r} is not supported by edgert convert")
    theta = rope.get("rope_theta", 1_000_000.0 if hp.arch == "gemma3" else None)
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    if (theta_swa := hp.rope_theta_swa) is not None:
        w.add_rope_freq_base_swa(float(theta_swa))
    w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", default=1e-6)))

    if hp.n_expert:
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(int(hp.need("num_experts_per_tok")))
        if hp.arch == "qwen3moe" and hp.get("norm_topk_prob") is False:
            # llama.cpp's qwen3moe graph always renormalises the top-k router weights.
            raise UnsupportedError("qwen3_moe with norm_topk_prob=false cannot be expressed in GGUF")

    head_dim = hp.get("head_dim")
    if hp.arch == "gemma3":
        head_dim = head_dim or 256
    if head_dim is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))

    if hp.arch == "llama":
        w.add_vocab_size(int(hp.need("vocab_size")))
        w.add_rope_dimension_count(int(head_dim or n_embd // hp.n_head))
    elif hp.arch == "qwen3moe":
        if (n_ff_exp := hp.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(int(n_ff_exp))
    elif hp.arch == "gemma3":
        if hp.get("attn_logit_softcapping") is not None:
            raise UnsupportedError("gemma3 with attn_logit_softcapping is not supported by llama.cpp")
        if (cap := hp.get("final_logit_softcapping")) is not None:
            w.add_final_logit_softcapping(float(cap))
        if hp.get("sliding_window_pattern") != 1 and hp.get("sliding_window") is not None:
            w.add_sliding_window(int(hp.raw["sliding_window"]))
    w.add_file_type(ftype)


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or tok in ("<pad>", "<mask>")


def _add_tokenizer(w: gguf.GGUFWriter, src: Path, hp: _HParams) -> None:
    """GPT-2 style (byte-level BPE) vocabulary from tokenizer.json + tokenizer_config.json."""
    tj_path = src / "tokenizer.json"
    if not tj_path.is_file():
        raise FormatError(f"{src} has no tokenizer.json; edgert converts byte-level BPE tokenizers only")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedError(
            f"{tj_path}: only byte-level BPE (GPT-2 style) tokenizers are supported, "
            f"this one is {model.get('type')!r} (byte_fallback={model.get('byte_fallback')})"
        )
    tc_path = src / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}

    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    n_vocab = int(hp.get("vocab_size", default=max(vocab.values()) + 1))
    if max(vocab.values()) >= n_vocab:
        raise FormatError(f"tokenizer has id {max(vocab.values())} but config.json vocab_size is {n_vocab}")
    by_id = {i: t for t, i in vocab.items()}

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = by_id[i]
        if i in added:
            special = added[i].get("special") or _looks_special(tok)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)

    w.add_tokenizer_model("gpt2")
    # llama.cpp picks the pre-tokenizer by hashing the tokenization of a probe text; edgert's
    # tiny tokenizers are plain GPT-2 byte-level BPE, which llama.cpp calls "default".
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:
        w.add_token_merges(merges)

    def token_id(kind: str) -> int | None:
        t = tc.get(f"{kind}_token")
        if isinstance(t, dict):
            t = t.get("content")
        if isinstance(t, str) and t in vocab:
            return vocab[t]
        cid = hp.get(f"{kind}_token_id")
        return cid if isinstance(cid, int) else None

    for kind in ("bos", "eos", "unk", "pad"):
        if (tid := token_id(kind)) is not None:
            getattr(w, f"add_{kind}_token_id")(tid)
    for kind in ("bos", "eos"):
        if isinstance(tc.get(f"add_{kind}_token"), bool):
            getattr(w, f"add_add_{kind}_token")(tc[f"add_{kind}_token"])
    template = tc.get("chat_template")
    if template is None and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        w.add_chat_template(template)


# --------------------------------------------------------------------------- convert


def convert(
    src_dir: str | Path,
    dst_path: str | Path,
    outtype: str = "Q8_0",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert an HF checkpoint folder (config.json, *.safetensors, tokenizer.json) to GGUF.

    Args:
        src_dir: folder of a llama / mistral / mixtral / qwen2 / qwen3 / qwen3_moe / gemma3 model.
        dst_path: the .gguf file to write (its folder must exist).
        outtype: F32, F16, BF16, Q8_0, Q4_0, Q4_1 or Q5_0 for the 2-D weights. Norms, biases and
            MoE routers stay F32; a weight whose rows do not split into quant blocks is stored F16.
        progress: called as ``progress(done_tensors, total_tensors)`` after each tensor.

    Returns:
        ``dst_path`` as a Path.

    Raises:
        FormatError: missing config.json / weights / tokenizer, or a tensor the model needs.
        UnsupportedError: an unknown model_type, outtype, rope type or tokenizer kind.
    """
    src, dst = Path(src_dir), Path(dst_path)
    key = outtype.upper()
    if key not in OUTTYPES:
        raise UnsupportedError(f"outtype {outtype!r} is not supported; use one of {list(OUTTYPES)}")
    out_q, ftype = OUTTYPES[key]
    hp = _load_hparams(src)
    st = _SafeTensors(_safetensors_files(src))
    w = None
    try:
        plan = _plan(hp, st)
        w = gguf.GGUFWriter(dst, hp.arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(src.resolve().name)
        _add_hparams(w, hp, ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, src, hp)

        qtypes = [_qtype(o.name, o.shape, out_q) for o in plan]
        for o, q in zip(plan, qtypes, strict=True):
            if q == Q.F32:
                w.add_tensor_info(o.name, o.shape, np.dtype(np.float32), 4 * math.prod(o.shape))
            elif q == Q.F16:
                w.add_tensor_info(o.name, o.shape, np.dtype(np.float16), 2 * math.prod(o.shape))
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(o.shape, q)
                w.add_tensor_info(o.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for done, (o, q) in enumerate(zip(plan, qtypes, strict=True), 1):
            data = o.make()
            if data.shape != o.shape:
                raise FormatError(f"{o.name}: expected shape {o.shape}, the checkpoint has {data.shape}")
            w.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), q))
            if progress is not None:
                progress(done, len(plan))
        w.close()
    except BaseException:
        if w is not None:  # never leave a truncated .gguf behind
            w.close()
            dst.unlink(missing_ok=True)
        raise
    finally:
        st.close()
    return dst
