"""Compiling the kernels ahead of a budgeted run (edgert.jit)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from edgert import jit
from edgert.errors import CompileError


def test_signature_table_reads_back_as_numba_writes_it():
    table = jit.signatures()
    assert sum(map(len, table.values())) > 40
    for key, sigs in table.items():
        for sig in sigs:
            assert f"({', '.join(map(str, jit.parse_signature(sig)))})" == sig, key


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_parts_cover_the_table_once_and_keep_a_kernel_whole(parts):
    table = jit.signatures()
    todo = [jit._part(table, i, parts) for i in range(parts)]
    flat = [kv for part in todo for kv in part]
    assert sorted(flat) == sorted((k, s) for k, v in table.items() for s in v)
    owners = {}
    for i, part in enumerate(todo):
        for key, _ in part:
            assert owners.setdefault(key, i) == i  # one index file, one writer


def test_ensure_compiled_runs_children_once_and_marks(tmp_path, monkeypatch):
    jit.ensure_compiled(tmp_path)  # numba's cache holds them already here: children load them
    assert list((tmp_path / "compiled").glob("all-*"))
    assert jit.kernels_cached(tmp_path)

    def no_child(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    jit.ensure_compiled(tmp_path)


def test_a_failing_compile_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(CompileError, match="compiling edgert's kernels failed: exit status 1"):
        jit.ensure_compiled(tmp_path)
    assert not list((tmp_path / "compiled").glob("all-*"))


def test_processes_that_start_together_compile_once(tmp_path, monkeypatch):
    calls = []

    def compile_slowly(progress):
        calls.append(1)
        time.sleep(0.3)

    monkeypatch.setattr(jit, "_compile_in_children", compile_slowly)
    threads = [threading.Thread(target=jit.ensure_compiled, args=(tmp_path,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and list((tmp_path / "compiled").glob("all-*"))


def test_children_import_the_installed_package_from_a_checkouts_root(tmp_path):
    """A checkout's root holds an edgert/ folder without the subpackages an install maps in;
    the compile children (and the benchmark workers) must not import it when started there.
    The same mechanism on a standard-library module, shadowed by a folder in the cwd."""
    from edgert.workers import module_command

    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "__init__.py").write_text("raise ImportError('the folder in the cwd')\n")
    shadowed = subprocess.run(
        [sys.executable, "-m", "json.tool"], input="[1]", capture_output=True, text=True, cwd=tmp_path
    )
    assert shadowed.returncode != 0 and "the folder in the cwd" in shadowed.stderr  # what -m does
    r = subprocess.run(
        [*module_command(sys.executable, "json.tool"), "--compact"],
        input="[1, 2]",
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and r.stdout.strip() == "[1,2]", r.stderr
