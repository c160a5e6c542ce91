"""From a model reference (GGUF file, HF folder, or known name) to model + tokenizer.

Weights are cataloged, not read: the model holds zero-copy views of the files and the OS
pages bytes in as the forward first touches them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from edgert import hub, jit, models
from edgert.errors import BudgetError, FormatError
from edgert.gguf import GGUFFile
from edgert.models.base import ModelArgs, Shard, Transformer
from edgert.tokenizer import Tokenizer
from edgert.weights import TensorRef, WeightStore, gguf_catalog, safetensors_catalog

_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
# GGUF metadata arrays that only build the tokenizer; held as Python strings they cost 29 MiB
# for a 152k-token vocabulary, so they are dropped once it is built.
_VOCAB_KEYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
)


@dataclass(frozen=True)
class ModelSource:
    path: Path
    kind: str  # "gguf" | "hf"
    args: ModelArgs
    store: WeightStore
    metadata: dict
    tokenizer: Tokenizer


def resolve(model: str | Path, cache_dir: Path | None = None, progress=None) -> Path:
    """A path that exists, or a known name (pulled on first use)."""
    p = Path(model).expanduser()
    if p.exists():
        return p
    if hub.find(str(model)) is not None:
        return hub.pull(str(model), cache_dir, progress)
    if p.suffix in (".gguf", ".safetensors") or "/" in str(model):
        raise FormatError(f"{p}: no such model file or folder")
    return hub.pull(str(model), cache_dir, progress)  # raises ModelNotFoundError with the list


def open_source(path: Path) -> ModelSource:
    if path.is_dir():
        return _open_hf(path)
    if path.suffix == ".safetensors":
        return _open_hf(path.parent)
    return _open_gguf(path)


def _open_gguf(path: Path) -> ModelSource:
    gf = GGUFFile(path)
    module, args = models.from_gguf(gf.metadata, gf.architecture)
    refs: dict[str, TensorRef] = {}
    for name, ref in gguf_catalog(gf).items():
        m = _EXPS.match(name)
        if m:  # stacked experts (n_expert, rows, cols) -> one addressable ref per expert
            for r in ref.split(f"blk.{m[1]}.ffn_{m[2]}.{{}}.weight"):
                refs[r.name] = r
        else:
            refs[name] = ref
    tok = Tokenizer.from_gguf_metadata(gf.metadata)
    for k in _VOCAB_KEYS:
        gf.metadata.pop(k, None)
    return ModelSource(path, "gguf", args, WeightStore(refs), gf.metadata, tok)


def _open_hf(folder: Path) -> ModelSource:

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{folder}: not a model folder (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_path}: corrupt JSON ({e})") from None
    module, args = models.from_hf(cfg)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder}: no *.safetensors weights")
    refs: dict[str, TensorRef] = {}
    for f in files:
        for hf_name, ref in safetensors_catalog(f).items():
            for r in _hf_refs(hf_name, ref, args):
                refs[r.name] = r
    if "output.weight" not in refs and not cfg.get("tie_word_embeddings", True):
        raise FormatError(f"{folder}: the checkpoint lacks lm_head.weight")
    tok = Tokenizer.from_hf_folder(folder)
    return ModelSource(folder, "hf", args, WeightStore(refs), cfg, tok)


def _hf_refs(hf_name: str, ref: TensorRef, args: ModelArgs) -> list[TensorRef]:
    """An HF tensor under its internal (GGUF) name; fused expert tensors split per expert."""
    from edgert import names

    try:
        name = names.gguf_name(hf_name, args.arch)
    except KeyError:
        return []  # not a tensor of the text model (e.g. a vision tower): never referenced
    if name is None:
        return []
    m = re.match(r"blk\.(\d+)\.ffn_(gate_up|down)_exps\.weight$", name)
    if not m:
        return [TensorRef(name, ref.path, ref.offset, ref.nbytes, ref.qtype, ref.shape)]
    i, kind = m[1], m[2]
    if kind == "down":
        return ref.split(f"blk.{i}.ffn_down.{{}}.weight")
    n_exp, rows = ref.shape[0], ref.shape[1]  # (E, 2 * n_ff, dim), gate rows first
    ff = rows // 2
    out = []
    for e in range(n_exp):
        out.append(ref.rows(e * rows, e * rows + ff, f"blk.{i}.ffn_gate.{e}.weight"))
        out.append(ref.rows(e * rows + ff, (e + 1) * rows, f"blk.{i}.ffn_up.{e}.weight"))
    return out


def build(
    src: ModelSource,
    context: int | None = None,
    max_tokens: int = 64,
    memory_budget: str | int | None = None,
    profile: str | None = None,
    cache_dir: Path | None = None,
    pack_stream: bool = True,
    progress=None,
    **kw,
) -> Transformer:
    """The model, ready to run. With a `memory_budget` ("1.5GiB", bytes, ...), the offload
    planner decides which units stay resident and the rest stream from disk; `profile`
    (a shipped profile name or a TOML path) is the device the plan predicts speed for.

    Streamed units are read from the packed stream file in `cache_dir` (default
    ~/.cache/edgert), written on first use (`progress(what, done, total)` follows it), so
    they run on the fast kernels (AVX512-VNNI); `pack_stream=False` reads them from the model
    file, which a shard's column slices (`shard=`, cluster mode) cannot stream from.

    Raises:
        BudgetError: the budget is below the minimum working set (the message gives it).
        UnsupportedError: the plan needs something the streamer cannot do yet.
        CacheError: the packed stream file cannot be written.
    """
    module = models.module_for(src.args.arch)
    ctx = min(context or src.args.context_length, src.args.context_length)
    plan = stream = None
    if memory_budget is not None:
        plan = make_plan(
            src, memory_budget, ctx, max_tokens, profile, kw.get("kv_bits", 16), pack_stream, kw.get("shard")
        )
        cache = cache_dir or hub.default_cache_dir()
        # a budgeted process never compiles: compiling takes far more memory than running
        jit.ensure_compiled(cache, progress)
        src.store.drop_cache = True  # what is packed leaves the page cache too
        if plan.packed and plan.streamed:
            from edgert.offload.packed import stream_file

            shard = _partial(src.args, kw.get("shard"))
            stream = stream_file(
                src.path, src.store, plan.units, plan.streamed, cache, progress, repr(shard) if shard else ""
            )
    return module.Model(src.args, src.store, ctx, max_tokens=max_tokens, plan=plan, stream_file=stream, **kw)


def make_plan(
    src: ModelSource,
    memory_budget,
    context: int,
    max_tokens: int = 64,
    profile: str | None = None,
    kv_bits: int = 16,
    pack_stream: bool = True,
    shard=None,
):
    """The offload plan `build` follows, for this device's `shard` of the model (None: all of
    it); `pack_stream` as there."""
    from edgert.offload.memory import Memory
    from edgert.offload.plan import measured_overhead, plan_model
    from edgert.offload.profile import default_profile
    from edgert.quant.pack import HAVE_VNNI

    try:
        budget = Memory.parse(memory_budget)
    except ValueError as e:
        raise BudgetError(f"memory budget: {e}") from None
    prof, _ = default_profile(profile)
    return plan_model(
        src.store,
        src.args,
        budget,
        context,
        prof,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        shard=shard,
        overhead=measured_overhead(),
        # the packed stream file holds records for the fast kernels (AVX512-VNNI) and a shard's
        # column slices made contiguous (any CPU: they stream from nowhere else)
        packed=pack_stream and (HAVE_VNNI or _partial(src.args, shard) is not None),
    )


def _partial(args: ModelArgs, shard: Shard | None) -> Shard | None:
    """`shard` if it is a part of the model, None if it is all of it (or not given)."""
    return None if shard is None or shard == Shard.full(args) else shard
