"""The command line, as a user meets it: subprocesses of `python -m edgert.apps.cli`.

Bad input gets one line on stderr starting with "error:", a non-zero exit and no traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY, cache_dir

from edgert.convert import convert


def edgert(*args, stdin=None, timeout=300, env=None):
    e = {**os.environ, "EDGERT_HOME": str(cache_dir()), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "edgert.apps.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )


def assert_clean_error(r, *needles, code=None):
    from edgert.apps.cli import COMPILE_NOTICE

    lines = [x for x in r.stderr.strip().splitlines() if x != COMPILE_NOTICE]
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return convert(TINY / "llama", tmp_path_factory.mktemp("g") / "tiny-llama-q8_0.gguf", "Q8_0")


# ---- bad input -------------------------------------------------------------------------


def test_missing_file():
    assert_clean_error(edgert("run", "/no/such/model.gguf", "-p", "hi"), "no such model")


def test_unknown_model_name():
    assert_clean_error(edgert("run", "no-such-model", "-p", "hi"), "unknown model", "smollm2-135m")


def test_truncated_gguf(tiny_gguf, tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    assert_clean_error(edgert("run", bad, "-p", "hi"), "truncated")


def test_truncated_header(tiny_gguf, tmp_path):
    bad = tmp_path / "header.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:100])
    assert_clean_error(edgert("info", bad), "truncated")


def test_not_gguf(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_clean_error(edgert("run", bad, "-p", "hi"), "not a GGUF file")


def test_corrupt_header(tiny_gguf, tmp_path):
    raw = bytearray(tiny_gguf.read_bytes())
    raw[16:24] = (2**40).to_bytes(8, "little")  # absurd metadata count
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(raw))
    assert_clean_error(edgert("run", bad, "-p", "hi"), "corrupt")


def _gguf_with(tmp_path, arch="llama", qtype=None):
    import gguf

    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    data = np.zeros((4, 32), np.float32)
    if qtype is None:
        w.add_tensor("token_embd.weight", data)
    else:  # bytes of a block type edgert does not read
        w.add_tensor("token_embd.weight", np.zeros((4, 66), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_architecture(tmp_path):
    assert_clean_error(edgert("run", _gguf_with(tmp_path, "mamba9"), "-p", "hi"), "architecture", "mamba9")


def test_unknown_block_type(tmp_path):
    import gguf

    path = _gguf_with(tmp_path, qtype=gguf.GGMLQuantizationType.IQ2_XXS)
    assert_clean_error(edgert("info", path), "block type")


def test_corrupt_safetensors(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(TINY / "llama", folder)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size - 1000])
    assert_clean_error(edgert("run", folder, "-p", "hi"), "truncated")
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_clean_error(edgert("run", folder, "-p", "hi"), "corrupt")


def test_folder_without_config(tmp_path):
    assert_clean_error(edgert("run", tmp_path, "-p", "hi"), "config.json")


def test_prompt_longer_than_context():
    r = edgert("run", TINY / "llama", "-p", "many words " * 200, "-c", "32")
    assert_clean_error(r, "context")


def test_bad_flags():
    assert_clean_error(edgert("run", TINY / "llama", "-p", "hi", "--temperature", "warm"), code=2)
    assert_clean_error(edgert("run", TINY / "llama", "-p", "hi", "--no-such-flag"), code=2)
    assert_clean_error(edgert("run", TINY / "llama"), "prompt", code=2)


# ---- working commands --------------------------------------------------------------------


def test_run_stdout_is_only_the_completion():
    r = edgert("run", TINY / "llama", "-p", "hello", "-n", "5", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    import edgert as api

    llm = api.load(TINY / "llama", context=64)
    expected = llm.generate("hello", max_tokens=5, ignore_eos=True)
    assert r.stdout == expected + "\n"
    assert "tok/s" in r.stderr


def test_run_llama_parity_prints_llama_cpps_greedy_text(real_model):
    """`run --llama-parity` on SmolLM2 (Q4_1) writes exactly the text of llama.cpp's greedy tokens
    (recorded in the golden file) for this prompt."""
    import json

    from conftest import GOLDEN

    from edgert import loader

    golden = json.loads((GOLDEN / "model-smollm2-135m.json").read_text())
    prompt = golden["prompts"][0]
    path = real_model("smollm2-135m")
    want = loader.open_source(path).tokenizer.decode(prompt["greedy"][:24])
    r = edgert("run", path, "-p", prompt["text"], "-n", "24", "-c", "512", "--ignore-eos", "--llama-parity")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_compile_notice_only_until_a_run_has_compiled(tmp_path):
    """The first run on a new cache says it compiles; once a run has generated, later runs do
    not, even though they never compiled the kernels that other paths use (e.g. 4-bit KV)."""
    from edgert.apps.cli import COMPILE_NOTICE

    env = {"EDGERT_HOME": str(tmp_path)}
    first = edgert("run", TINY / "llama", "-p", "hello", "-n", "2", env=env)
    again = edgert("run", TINY / "llama", "-p", "hello", "-n", "2", env=env)
    assert first.returncode == 0 and again.returncode == 0, (first.stderr, again.stderr)
    assert COMPILE_NOTICE in first.stderr and COMPILE_NOTICE not in again.stderr


def test_info(tiny_gguf):
    r = edgert("info", tiny_gguf)
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "Q8_0" in r.stdout and "blk.0" in r.stdout


def test_chat_piped_stdin():
    r = edgert("chat", TINY / "llama", "-n", "4", stdin="hello there\n/stats\n/reset\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "cleared" in r.stderr
    assert len(r.stdout.splitlines()) == 2  # one answer line per message


def test_pull_fresh_cache(tmp_path):
    """Download, join and verify a real model into an empty cache, as a newcomer would."""
    r = edgert("pull", "smollm2-135m", env={"EDGERT_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size == 98362432
