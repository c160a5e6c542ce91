"""`edgert perplexity`: the sliding-window method against a direct computation, the comparison
mode, and bad input at the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY
from test_cli import assert_clean_error, edgert

from edgert import loader
from edgert.perplexity import chunks, evaluate, log_softmax, perplexity, spans

WORDS = "the king queen ghost castle night sword poison play players father son ophelia to be or not".split()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS, 400)))
    return path


def test_matches_direct_computation(text):
    """Chunks of ctx tokens (BOS first), each from an empty cache, second half scored."""
    ctx = 96
    rep = perplexity(TINY / "llama", text, ctx, kv_bits=[16, 4], n_chunks=2)
    src = loader.open_source(TINY / "llama")
    tok = src.tokenizer
    ids = tok.encode(text.read_text(), add_bos=False)
    model = loader.build(src, context=ctx)
    assert not tok.add_bos  # so chunks are the text's tokens as they are
    nll = []
    for c in range(2):
        chunk = np.array(ids[c * ctx : (c + 1) * ctx], np.int32)
        cache = model.make_cache()
        logits = np.concatenate([model(chunk[i : i + 32], cache, i, True).copy() for i in range(0, ctx, 32)])
        lp = log_softmax(logits)
        nll += [-lp[j, chunk[j + 1]] for j in range(ctx // 2, ctx - 1)]
    ref, q4 = rep.settings
    assert ref.n_scored == len(nll) == 2 * (ctx // 2 - 1)
    assert ref.ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)
    ref, same = evaluate(model, ids, ctx, [16, 16], None, 2)
    assert (same.ppl, same.top1_agreement, same.mean_kl) == (ref.ppl, 1.0, 0.0)
    assert 0.0 < q4.mean_kl < 0.5 and q4.top1_agreement > 0.6  # tiny random models amplify errors


PROSE = (  # Dickens, A Tale of Two Cities; Austen, Pride and Prejudice (public domain)
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way - in short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only.\n\nIt is a truth universally acknowledged, that a single man in possession of a "
    "good fortune, must be in want of a wife. However little known the feelings or views of such a man may "
    "be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters."
)


def test_real_model_4bit_cost(real_model, tmp_path):
    """SmolLM2-135M on prose: the 8- and 4-bit caches keep its predictions close to the fp16 cache's.
    (The fp16 cache itself is at KL ~0.004 from a float32 one: ggml rounds q and probabilities to fp16.)"""
    (tmp_path / "prose.txt").write_text(PROSE)
    rep = perplexity(real_model("smollm2-135m"), tmp_path / "prose.txt", 192, kv_bits=[16, 8, 4])
    ref, q8, q4 = rep.settings
    assert q8.mean_kl < 0.01 and q8.top1_agreement > 0.9
    assert q4.mean_kl < 0.03 and q4.top1_agreement > 0.85  # measured: 0.013, 0.89 (95 tokens)
    assert abs(q4.ppl / ref.ppl - 1) < 0.03


def test_chunks_start_with_bos():
    assert chunks(list(range(10, 30)), 8, 2, bos_id=1) == [[1, *range(11, 18)], [1, *range(19, 26)]]
    assert spans(8, 3) == [(0, 3, False), (3, 4, False), (4, 7, True), (7, 8, True)]


def test_cli_json(text, tmp_path):
    out = tmp_path / "ppl.json"
    r = edgert(
        "perplexity", TINY / "llama", "--text", text, "-c", 64, "--kv-bits", "8,4",
        "--compare-kv-bits", 16, "--chunks", 1, "--decode", 4, "--json", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert [s["kv"] for s in d["settings"]] == ["16-bit", "8-bit", "4-bit"]
    assert d["n_tokens"] == 64 and all(s["decode_tps"] > 0 for s in d["settings"])
    assert "4-bit" in r.stdout and "KL" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--text", "/no/such.txt"], "no such text file"),
        (["-c", 4096], "trained context"),
        (["--kv-bits", 3], "16, 8, 4"),
        (["--text", "short", "-c", 64], "fewer than one chunk"),
    ],
)
def test_bad_input(text, tmp_path, args, needle):
    (tmp_path / "short").write_text("To be, or not to be.")
    args = [tmp_path / a if a == "short" else a for a in args]
    args = args if args[0] == "--text" else ["--text", text, *args]
    assert_clean_error(edgert("perplexity", TINY / "llama", *args), needle, code=1)


def test_run_with_kv_bits():
    r = edgert("run", TINY / "llama", "-p", "hello", "-n", 4, "--ignore-eos", "--kv-bits", 4, "-c", 64)
    assert r.returncode == 0, r.stderr
    assert_clean_error(edgert("run", TINY / "llama", "-p", "hello", "--kv-bits", 5), "16, 8, 4", code=1)
