"""Tokenizers that give the same ids as llama.cpp, built from GGUF metadata or a Hugging Face folder.

Two GGUF vocabulary kinds are supported:
- "gpt2" (byte-level BPE): a `tokenizers` BPE model built from the GGUF tokens and merges, with
  llama.cpp's pre-tokenizer regexes for `tokenizer.ggml.pre`.
- "llama" (SentencePiece style, scored tokens): llama.cpp's `llm_tokenizer_spm` in pure Python.

Special tokens (control and user-defined) are cut out of the text before either model runs, in the
order llama.cpp uses (`tokenizer_st_partition`: longest token text first).
"""

from __future__ import annotations

import codecs
import heapq
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import FormatError, UnsupportedError

# GGUF token types (tokenizer.ggml.token_type)
T_UNDEFINED, T_NORMAL, T_UNKNOWN, T_CONTROL, T_USER_DEFINED, T_UNUSED, T_BYTE = range(7)


class TokenTexts(Sequence[str]):
    """The vocabulary's texts as one UTF-8 buffer and offsets. A list of 152k `str` holds 13 MiB
    of Python objects for the life of the model, and a memory budget counts them as the runtime's
    own share; this holds 2 MiB. Any `str` round-trips, lone surrogates included."""

    __slots__ = ("_buf", "_off")

    def __init__(self, texts: Iterable[str]):
        enc = [t.encode("utf-8", "surrogatepass") for t in texts]
        self._off = np.zeros(len(enc) + 1, np.int64)
        np.cumsum([len(b) for b in enc], out=self._off[1:])
        self._buf = b"".join(enc)

    def __len__(self) -> int:
        return len(self._off) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._off) - 1
        if not -n <= i < n:
            raise IndexError(f"token id {i} out of range for a vocabulary of {n}")
        i %= n
        return self._buf[self._off[i] : self._off[i + 1]].decode("utf-8", "surrogatepass")


# Token texts llama.cpp treats as end of generation (llama_vocab::impl::load).
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<｜end▁of▁sentence｜>", "[e~[",
    }
)  # fmt: skip
_EOT_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
        "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
    }
)  # fmt: skip
# FIM pad / repo / file-separator tokens also end generation in llama.cpp.
_FIM_EOG_TEXTS = (
    ("tokenizer.ggml.fim_pad_token_id", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")),
    (
        "tokenizer.ggml.fim_rep_token_id",
        ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ),
    ("tokenizer.ggml.fim_sep_token_id", ("<|file_sep|>",)),
)
# Other texts llama.cpp promotes to control tokens (FIM prefix/suffix/middle, eom).
_CONTROL_TEXTS = frozenset(
    {
        "<|eom_id|>", "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
        "▁<PRE>", "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
        "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>",
        "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
        "<|middle|>",
    }
)  # fmt: skip

# llama.cpp pre-tokenizer regexes (llm_tokenizer_bpe), applied in order, each splitting the pieces of the
# previous one. Written for the Oniguruma engine of `tokenizers`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + (
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], True),
    "gpt-2": ([_GPT2], True),
    "phi-2": ([_GPT2], True),
    "mpt": ([_GPT2], True),
    "olmo": ([_GPT2], True),
    "smollm": ([r"\p{N}", _GPT2], False),
    "starcoder": ([r"\p{N}", _GPT2], True),
    "refact": ([r"\p{N}", _GPT2], True),
    "command-r": ([r"\p{N}", _GPT2], False),
    "codeshell": ([r"\p{N}", _GPT2], True),
    "qwen2": ([_QWEN2], False),
    "deepseek-r1-qwen": ([_QWEN2], False),
    "stablelm2": ([_QWEN2], True),
    "llama3": ([_LLAMA3], True),
    "llama-v3": ([_LLAMA3], True),
    "llama-bpe": ([_LLAMA3], True),
    "falcon3": ([_LLAMA3], True),
    "dbrx": ([_LLAMA3], True),
    "smaug-bpe": ([_LLAMA3], True),
}  # name -> (regexes, clean_up_tokenization_spaces)
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3"}  # these also add BOS by default


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table used by byte-level BPE vocabularies."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


class _BpeModel:
    """Byte-level BPE through `tokenizers`, pre-tokenized the way llama.cpp does it."""

    byte_level = True

    def __init__(self, tokens: list[str], merges: list[str], regexes: list[str], ignore_merges: bool):
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as HfTokenizer

        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for m in merges:
            i = m.find(" ", 1)
            if i < 0:
                raise FormatError(f"bad BPE merge {m!r} in tokenizer.ggml.merges: expected 'left right'")
            pairs.append((m[:i], m[i + 1 :]))
        try:
            model = models.BPE(vocab, pairs, ignore_merges=ignore_merges)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise FormatError(f"cannot build the BPE model from GGUF tokens and merges: {e}") from e
        self._hf = HfTokenizer(model)
        splits = [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids


class _SpmModel:
    """llama.cpp's SentencePiece-style tokenizer: greedy bigram merges by highest token score."""

    byte_level = False

    def __init__(self, token_to_id: dict[str, int], scores: list[float], byte_ids: list[int]):
        self._ids = token_to_id
        self._scores = scores
        self._byte_ids = byte_ids

    def encode(self, text: str) -> list[int]:
        n = len(text)
        if n == 0:
            return []
        ids, scores = self._ids, self._scores
        # symbols are code points; a merged symbol is the span start[i] : start[i] + size[i]
        start = list(range(n))
        size = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []
        push = heapq.heappush
        # seed with every 2-character token; the heap pops highest score, then leftmost
        for i in range(n - 1):
            tid = ids.get(text[i : i + 2])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        pop = heapq.heappop
        while heap:
            _, left, right, total = pop(heap)
            sl, sr = size[left], size[right]
            if sl == 0 or sr == 0 or sl + sr != total:
                continue  # one side was merged since this pair was queued
            size[left] = total
            size[right] = 0
            r2 = nxt[right]
            nxt[left] = r2
            if r2 >= 0:
                prev[r2] = left
            p = prev[left]
            if p >= 0:
                s = start[p]
                tid = ids.get(text[s : s + size[p] + total])
                if tid is not None:
                    push(heap, (-scores[tid], p, left, size[p] + total))
            if r2 >= 0:
                s = start[left]
                tid = ids.get(text[s : s + total + size[r2]])
                if tid is not None:
                    push(heap, (-scores[tid], left, r2, total + size[r2]))
        out = []
        i = 0
        byte_ids = self._byte_ids
        while i != -1:
            piece = text[start[i] : start[i] + size[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:  # byte fallback: <0xXX> per UTF-8 byte
                out.extend(byte_ids[b] for b in piece.encode("utf-8", errors="surrogatepass"))
            i = nxt[i]
        return out


class _HfModel:
    """A Hugging Face tokenizer.json, used as is (its own added-token handling)."""

    def __init__(self, hf: Any, byte_level: bool):
        self._hf = hf
        self.byte_level = byte_level

    def encode(self, text: str, special: bool) -> list[int]:
        self._hf.encode_special_tokens = not special
        return self._hf.encode(text, add_special_tokens=False).ids


class _SpecialTokens:
    """Control, user-defined and unknown tokens: a character trie plus llama.cpp's priority order."""

    def __init__(self, tokens: list[str], types: list[int]):
        import re

        ids = [i for i, t in enumerate(types) if t in (T_CONTROL, T_USER_DEFINED, T_UNKNOWN) and tokens[i]]
        order = sorted(ids, key=lambda i: (-len(tokens[i].encode()), i))  # llama.cpp: longest bytes first
        self.rank = {tid: r for r, tid in enumerate(order)}
        self.length = {tid: len(tokens[tid]) for tid in ids}
        self.user_defined = {tid: types[tid] == T_USER_DEFINED for tid in ids}
        self.trie: dict = {}
        for tid in ids:
            node = self.trie
            for c in tokens[tid]:
                node = node.setdefault(c, {})
            node[None] = tid
        chars = "".join(re.escape(c) for c in self.trie)
        self.first_chars = re.compile(f"[{chars}]" if chars else "(?!)")


class Tokenizer:
    """Text <-> token ids, matching llama.cpp for GGUF vocabularies.

    Build with `Tokenizer.from_gguf_metadata(meta)` or `Tokenizer.from_hf_folder(path)`.
    Attributes: `bos_id` (int or None), `eos_id`, `eos_ids` (every end-of-generation id, as
    llama.cpp's `llama_vocab_is_eog`), `vocab_size`, `add_bos`, `tokens` (token texts), `chat_template`
    (the model's Jinja template; the built-in Gemma one for Gemma GGUFs without one; None means ChatML).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        types: Sequence[int],
        model: _BpeModel | _SpmModel | _HfModel,
        *,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        add_eos: bool = False,
        add_space_prefix: bool = False,
        clean_spaces: bool = False,
        chat_template: str | None = None,
    ):
        # (SentencePiece's own dict holds every text as a str already: a buffer would add to it)
        self.tokens = tokens if isinstance(model, _SpmModel) else TokenTexts(tokens)
        # one byte a token (GGUF defines types 0-6; one a byte cannot hold reads as undefined)
        self.types = bytes(t if 0 <= t < 256 else T_UNDEFINED for t in types)
        self._model = model
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = frozenset(eos_ids)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.clean_spaces = clean_spaces
        self.chat_template = chat_template
        self.vocab_size = len(tokens)
        self._piece_cache: dict[tuple[int, bool], bytes] = {}
        self._special: _SpecialTokens | None = None  # built on first encode

    # ---- construction ----

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (plain dict: scalars, list[str] string arrays, numpy arrays).

        Raises:
            FormatError: a required tokenizer key is missing or malformed.
            UnsupportedError: a vocabulary kind or pre-tokenizer edgert does not implement.
        """
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise FormatError("GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
        tokens = list(tokens)
        n = len(tokens)
        raw_types = meta.get("tokenizer.ggml.token_type")
        types = [T_NORMAL] * n if raw_types is None else _as_list(raw_types)
        if len(types) < n:
            raise FormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        types = types[:n]

        if kind == "llama":
            bos, eos, add_bos, add_space_prefix, clean = 1, 2, True, True, False
            raw_scores = meta.get("tokenizer.ggml.scores")
            scores = [0.0] * n if raw_scores is None else _as_list(raw_scores)[:n]
            token_to_id = {t: i for i, t in enumerate(tokens)}
            byte_ids = []
            for b in range(256):
                tid = token_to_id.get(f"<0x{b:02X}>", token_to_id.get(chr(b)))
                byte_ids.append(-1 if tid is None else tid)
            model: _BpeModel | _SpmModel = _SpmModel(token_to_id, scores, byte_ids)
        elif kind == "gpt2":
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if pre not in _PRE:
                raise UnsupportedError(
                    f"BPE pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(_PRE))}"
                )
            regexes, clean = _PRE[pre]
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise FormatError("GGUF BPE tokenizer has no tokenizer.ggml.merges")
            bos, eos, add_bos, add_space_prefix = 11, 11, pre in _IGNORE_MERGES, False
            model = _BpeModel(tokens, list(merges), regexes, ignore_merges=pre in _IGNORE_MERGES)
        else:
            raise UnsupportedError(
                f"tokenizer kind {kind!r} is not supported (supported: 'gpt2' BPE, 'llama' SentencePiece)"
            )

        def special_id(key: str, default: int | None) -> int | None:
            v = meta.get(key)
            v = default if v is None else int(v)
            return v if v is not None and 0 <= v < n else None

        bos = special_id("tokenizer.ggml.bos_token_id", bos)
        eos = special_id("tokenizer.ggml.eos_token_id", eos)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", add_space_prefix))
        if add_bos and bos is None:
            raise FormatError("tokenizer.ggml.add_bos_token is true but the BOS token id is not set")

        eog = _find_eog(tokens, types, meta, n)
        for i in (eos, special_id("tokenizer.ggml.eot_token_id", None)):
            if i is not None:
                eog.add(i)
        return cls(
            tokens,
            types,
            model,
            bos_id=bos,
            eos_id=eos,
            eos_ids=eog,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            clean_spaces=clean,
            chat_template=meta.get("tokenizer.chat_template") or _builtin_template(meta),
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Build from a Hugging Face model folder (tokenizer.json, tokenizer_config.json, config.json).

        Raises:
            FormatError: tokenizer.json is missing or unreadable.
        """
        from tokenizers import Tokenizer as HfTokenizer

        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise FormatError(f"{folder} has no tokenizer.json; edgert reads only the fast-tokenizer format")
        try:
            hf = HfTokenizer.from_file(str(tj))
            spec = json.loads(tj.read_text(encoding="utf-8"))
        except Exception as e:
            raise FormatError(f"cannot read {tj}: {e}") from e
        tcfg = _read_json(folder / "tokenizer_config.json")
        mcfg = _read_json(folder / "config.json")

        n = hf.get_vocab_size(with_added_tokens=True)
        tokens = [""] * n
        for t, i in hf.get_vocab(with_added_tokens=True).items():
            if 0 <= i < n:
                tokens[i] = t
        normalizer, pre_tok = json.dumps(spec.get("normalizer")), json.dumps(spec.get("pre_tokenizer"))
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in pre_tok
        types = [T_NORMAL] * n
        for added in spec.get("added_tokens", []):
            i = added.get("id")
            if isinstance(i, int) and 0 <= i < n:
                types[i] = T_CONTROL if added.get("special") else T_USER_DEFINED
        for i, t in enumerate(tokens):
            if not byte_level and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = T_BYTE  # byte-fallback pieces, even where listed as added tokens

        vocab = {t: i for i, t in enumerate(tokens)}

        def token_id(key: str) -> int | None:
            v = tcfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return vocab.get(v) if isinstance(v, str) else None

        bos = token_id("bos_token")
        if bos is None and isinstance(mcfg.get("bos_token_id"), int):
            bos = mcfg["bos_token_id"]
        eos = token_id("eos_token")
        eog = {i for i, t in enumerate(tokens) if t in _EOG_TEXTS and types[i] == T_CONTROL}
        cfg_eos = mcfg.get("eos_token_id")
        for i in [*(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]), eos]:
            if isinstance(i, int) and 0 <= i < n:
                eog.add(i)
                eos = i if eos is None else eos
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(
            tokens,
            types,
            _HfModel(hf, byte_level),
            bos_id=bos,
            eos_id=eos,
            eos_ids=eog,
            add_bos=bool(tcfg.get("add_bos_token", False)) and bos is not None,
            add_eos=bool(tcfg.get("add_eos_token", False)) and eos is not None,
            # SentencePiece-style folders prepend "▁" when encoding; decoding drops that first space
            add_space_prefix=not byte_level and ("Prepend" in normalizer or "Metaspace" in pre_tok),
            clean_spaces=False,
            chat_template=template,
        )

    # ---- encoding ----

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`.

        Args:
            add_bos: None adds BOS (and EOS) as the model asks (llama.cpp `add_special`); True/False
                force BOS on or off (and never add EOS).
            special: parse the text of control tokens (e.g. "<|im_start|>") into their ids, as llama.cpp's
                `parse_special`. User-defined tokens are always parsed.
        """
        out: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            out.append(self.bos_id)
        if isinstance(self._model, _HfModel):
            out.extend(self._model.encode(text, special))
        else:
            is_prev_special = True
            for frag in self._partition(text, special):
                if isinstance(frag, int):
                    out.append(frag)
                    is_prev_special = True
                    continue
                if isinstance(self._model, _SpmModel):
                    if self.add_space_prefix and is_prev_special:
                        frag = " " + frag
                    frag = frag.replace(" ", "\u2581")
                out.extend(self._model.encode(frag))
                is_prev_special = False
        if add_bos is None and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, special: bool) -> list[str | int]:
        """Split special-token texts out of `text` with llama.cpp's rule (tokenizer_st_partition).

        Tokens are taken longest first (by UTF-8 length, then id); each claims its left-to-right,
        non-overlapping occurrences that do not overlap text an earlier token claimed. One trie scan finds
        every occurrence first, so the cost does not grow with the number of special tokens.
        """
        if not text:
            return []
        if self._special is None:
            self._special = _SpecialTokens(self.tokens, self.types)
        st = self._special
        found: dict[int, list[int]] = {}  # token id -> start offsets of all its occurrences
        n = len(text)
        for m in st.first_chars.finditer(text):
            p = q = m.start()
            node = st.trie
            while q < n:
                node = node.get(text[q])
                if node is None:
                    break
                q += 1
                tid = node.get(None)
                if tid is not None and (special or st.user_defined[tid]):
                    found.setdefault(tid, []).append(p)
        if not found:
            return [text]
        claimed = bytearray(n)
        spans = []
        for tid in sorted(found, key=st.rank.__getitem__):
            size = st.length[tid]
            free_from = 0
            for p in found[tid]:
                if p >= free_from and claimed.find(1, p, p + size) < 0:
                    claimed[p : p + size] = b"\x01" * size
                    spans.append((p, size, tid))
                    free_from = p + size
        spans.sort()
        frags: list[str | int] = []
        pos = 0
        for p, size, tid in spans:
            if p > pos:
                frags.append(text[pos:p])
            frags.append(tid)
            pos = p + size
        if pos < n:
            frags.append(text[pos:])
        return frags

    # ---- decoding ----

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token `token_id` stands for (a piece may hold part of a UTF-8 character).

        With `special=False`, control tokens give b"" (llama.cpp `token_to_piece(special=false)`).
        """
        key = (token_id, special)
        piece = self._piece_cache.get(key)
        if piece is None:
            piece = self._piece_cache[key] = self._make_piece(token_id, special)
        return piece

    def _make_piece(self, token_id: int, special: bool) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        text, kind = self.tokens[token_id], self.types[token_id]
        if kind in (T_CONTROL, T_UNKNOWN):
            return text.encode() if special else b""
        if kind == T_USER_DEFINED:
            return text.encode()
        if kind == T_NORMAL:
            if self._model.byte_level:
                return _byte_decode(text)
            return text.replace("\u2581", " ").encode("utf-8", errors="surrogateescape")
        if kind == T_BYTE:
            return bytes([int(text[3:5], 16)]) if text.startswith("<0x") else text.encode()
        return b""  # unused / undefined tokens render as nothing, as in llama.cpp

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """Raw bytes of `ids`, as llama.cpp's `llama_detokenize(remove_special=skip_special,
        unparse_special=not skip_special)`."""
        ids = list(ids)
        strip_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            ids = ids[1:]
            strip_space = False
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        pieces = [self.token_to_piece(i, not skip_special) for i in ids]
        if strip_space and pieces and pieces[0][:1] == b" ":
            pieces[0] = pieces[0][1:]
        out = b"".join(pieces)
        return _clean_spaces(out) if self.clean_spaces else out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. skip_special drops control tokens and the BOS."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream(self, skip_special: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer for one generated sequence."""
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Incremental detokenizer: `add(id)` returns the new text, never half a UTF-8 character.

    The concatenation of every `add` result and `flush()` equals `tokenizer.decode(ids, skip_special)`
    (except that a trailing EOS is not removed when skip_special is set, since the stream cannot know
    it is the last token).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._first = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._raw = bytearray()  # only kept when the tokenizer cleans spaces (needs context)
        self._emitted = 0

    def add(self, token_id: int) -> str:
        tok = self._tok
        piece = tok.token_to_piece(token_id, not self._skip)
        if self._first:
            self._first = False
            if self._skip and tok.add_bos and token_id == tok.bos_id:
                return ""
            if tok.add_space_prefix and piece[:1] == b" ":
                piece = piece[1:]
        if not tok.clean_spaces:
            return self._utf8.decode(piece)
        # space clean-up looks up to 3 characters ahead of a space: hold the tail back until it is settled
        self._raw += piece
        text = _clean_spaces(bytes(self._raw))
        cut = len(text)
        space = text.find(b" ", max(0, cut - 3))
        if space >= 0:
            cut = space
        delta = self._utf8.decode(text[self._emitted : cut])
        self._emitted = cut
        return delta

    def flush(self) -> str:
        """The text still held back (an incomplete UTF-8 tail becomes U+FFFD)."""
        tail = b""
        if self._tok.clean_spaces:
            text = _clean_spaces(bytes(self._raw))
            tail, self._emitted = text[self._emitted :], len(text)
        return self._utf8.decode(tail, final=True)


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces: ' ?' ' !' ' .' ' ,' -> no space, " ' " -> "'",
    " 's" " 'm" " 're" " 've" -> no space."""
    t = bytearray(text)
    out = bytearray(t[:1])
    for i in range(1, len(t)):
        if t[i - 1] == 0x20 and t[i] in b"?!.,":
            out.pop()
        out.append(t[i])
    t, out = out, bytearray(out[:1])
    i = 1
    while i < len(t):
        x = t[i]
        if x == 0x27 and i + 1 < len(t) and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            out.pop()
            out.append(x)
            i += 2  # the space after the apostrophe goes too
            continue
        out.append(x)
        i += 1
    t, out = out, bytearray(t[:1])
    for i in range(1, len(t)):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < len(t):
            x1 = t[i + 1]
            x2 = t[i + 2] if i + 2 < len(t) else None
            if x1 in b"sm" or (x2 is not None and (x1, x2) in ((0x72, 0x65), (0x76, 0x65))):
                out.pop()
        out.append(x)
    return bytes(out)


def _byte_decode(text: str) -> bytes:
    """Bytes of a byte-level BPE token; characters outside GPT-2's table render as llama.cpp does."""
    out = bytearray()
    for c in text:
        b = _CHAR_TO_BYTE.get(c)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
    return bytes(out)


def _find_eog(tokens: list[str], types: list[int], meta: Mapping[str, Any], n: int) -> set[int]:
    """End-of-generation ids and control promotions, following llama.cpp's text-based detection."""
    eog: set[int] = set()
    wanted = _EOG_TEXTS | _EOT_TEXTS | _CONTROL_TEXTS | {t for _, texts in _FIM_EOG_TEXTS for t in texts}
    by_text = {}
    for i, t in enumerate(tokens):
        if t in wanted:
            by_text.setdefault(t, i)
    for key, texts in _FIM_EOG_TEXTS:
        v = meta.get(key)
        i = (
            int(v)
            if v is not None and 0 <= int(v) < n
            else next((by_text[t] for t in texts if t in by_text), None)
        )
        if i is not None:
            eog.add(i)
            types[i] = T_CONTROL
    for t, i in by_text.items():
        if t in _EOG_TEXTS:
            eog.add(i)
        if (t in _EOG_TEXTS or t in _EOT_TEXTS or t in _CONTROL_TEXTS) and types[i] != T_CONTROL:
            types[i] = T_CONTROL
    return eog


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)  # numpy converts in C


def _builtin_template(meta: Mapping[str, Any]) -> str | None:
    """Gemma GGUFs carry no chat template; llama.cpp falls back to its built-in Gemma format."""
    arch = meta.get("general.architecture")
    if isinstance(arch, str) and arch.startswith("gemma"):
        from edgert.chat_template import GEMMA

        return GEMMA
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}
