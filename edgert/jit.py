"""numba's kernels: whether its on-disk cache holds them, and compiling them ahead of a run.

The first run after an install compiles the kernels it uses (tens of seconds on a small
device); later runs load machine code from the cache in milliseconds. The CLI says so up
front instead of looking hung.

Compiling is also the most memory a run ever asks for: LLVM's heap and the compiled
modules numba keeps grow the process by ~250 MiB, far more than loading the same kernels
from the cache. A process that runs under a memory budget therefore never compiles:
`ensure_compiled` compiles every specialization edgert uses (`kernel_signatures.json`) in a
short-lived child process first, whose memory goes back to the system when it exits, and
the budgeted process only loads machine code. The table is checked by the test suite: a
test session that compiles a signature the table lacks fails.

A run without a budget compiles only the kernels its path needs (a greedy chat never
compiles the 4-bit KV cache's), so the CLI marks the sources as compiled once a run has
generated (`mark_kernels_cached`). Both marks are named after the kernel modules' paths,
sizes and modification times, which is what numba's own cache is keyed on, and the table's:
an upgrade or an edit recompiles, and announces it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from edgert.errors import CompileError
from edgert.workers import module_command

try:
    import fcntl
except ImportError:  # not POSIX: processes that start together may both compile
    fcntl = None

SIGNATURES = Path(__file__).with_name("kernel_signatures.json")


def _kernel_modules() -> list:
    from edgert import kernels, sample
    from edgert.models import base
    from edgert.quant import kernels as qkernels
    from edgert.quant import kv_kernels, pack

    return [kernels, qkernels, pack, kv_kernels, sample, base]


def _mark(cache_dir: Path, what: str = "kernels") -> Path:
    h = hashlib.sha256()
    # the table too: a specialization added to it is one the cache may not hold yet
    for f in [Path(m.__file__) for m in _kernel_modules()] + [SIGNATURES]:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return Path(cache_dir) / "compiled" / f"{what}-{h.hexdigest()[:20]}"


def kernels_cached(cache_dir: Path) -> bool:
    """True once a run of these kernel sources has compiled and cached what it used."""
    try:
        return _mark(cache_dir).exists() or _mark(cache_dir, "all").exists()
    except OSError:  # cannot tell: do not claim a compile
        return True


def mark_kernels_cached(cache_dir: Path) -> None:
    """Record that a run has compiled the kernels (best effort: a read-only cache only means
    the notice shows again)."""
    _touch(lambda: _mark(cache_dir))


def _touch(mark) -> None:
    try:
        m = mark()
        m.parent.mkdir(parents=True, exist_ok=True)
        m.touch()
    except OSError:
        pass


_ARRAY = re.compile(r"^(readonly )?array\((\w+), (\d)d, ([CAF])\)$")
_ARG = re.compile(r"(?:readonly )?array\([^)]*\)|\w+")


def _numba_type(name: str):
    """'int64', 'readonly array(uint8, 2d, C)', ... (numba's names for its types) -> the type."""
    from numba import types

    m = _ARRAY.match(name)
    if m:
        return types.Array(getattr(types, m[2]), int(m[3]), m[4], readonly=bool(m[1]))
    return types.boolean if name == "bool" else getattr(types, name)


def parse_signature(sig: str) -> tuple:
    """'(array(float32, 2d, C), int64)' -> numba's argument types."""
    return tuple(_numba_type(t) for t in _ARG.findall(sig))


def _part(table: dict[str, list[str]], part: int, parts: int) -> list[tuple[str, str]]:
    return [(key, sig) for key in sorted(table)[part::parts] for sig in table[key]]


def signatures() -> dict[str, list[str]]:
    """'module:function' -> its specializations that edgert runs, as numba prints them:
    '(array(float32, 2d, C), int64)'."""
    return json.loads(SIGNATURES.read_text())


def compiled_signatures() -> dict[str, list[str]]:
    """What this process has compiled or loaded, in the table's form (cached kernels only:
    helpers inlined into them are never compiled alone)."""
    import gc

    from numba.core.registry import CPUDispatcher

    out: dict[str, list[str]] = {}
    for d in gc.get_objects():
        if isinstance(d, CPUDispatcher) and d.py_func.__module__.startswith("edgert."):
            if d._cache.__class__.__name__ == "NullCache":  # not cache=True
                continue
            sigs = out.setdefault(f"{d.py_func.__module__}:{d.py_func.__qualname__}", [])
            sigs += [s for s in (f"({', '.join(map(str, sig))})" for sig in d.signatures) if s not in sigs]
    return {k: sorted(v) for k, v in sorted(out.items()) if v}


def compile_kernels(part: int = 0, parts: int = 1, progress=None) -> int:
    """Compile the table's specializations of every `parts`-th kernel from the `part`-th on,
    or load them from numba's cache, in this process; `progress(what, done, total)` follows
    it. A kernel's specializations stay in one part: numba keeps one index file per kernel,
    which two processes must not both write. Returns how many specializations there were."""
    import importlib

    todo = _part(signatures(), part, parts)
    for i, (key, sig) in enumerate(todo):
        module, name = key.split(":")
        dispatcher = getattr(importlib.import_module(module), name)
        dispatcher.compile(parse_signature(sig))
        if progress:
            progress("compiling kernels", i + 1, len(todo))
    return len(todo)


def ensure_compiled(cache_dir: Path, progress=None) -> None:
    """Make sure numba's cache holds every kernel before a budgeted run: when these sources
    have not been compiled ahead yet, compile them in child processes (one per core, up to
    four, as LLVM compiles on one thread: 2 min 21 s and ~650 MiB per child on a 2-core VM,
    once) whose memory goes back when they exit, and mark them. This process's memory stays
    what a run needs. Processes that start together compile once: the first holds a lock
    in `cache_dir` while the others wait for its mark.

    Raises:
        CompileError: a child failed (its last line says why).
    """
    try:
        mark = _mark(cache_dir, "all")
        if mark.exists():
            return
        mark.parent.mkdir(parents=True, exist_ok=True)
        lock = open(mark.parent / ".lock", "w")  # held until the mark is written
    except OSError:  # a read-only cache: compile, unmarked
        mark, lock = None, None
    try:
        if lock is not None and fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if mark.exists():  # another process compiled them while this one waited
                return
        _compile_in_children(progress)
        if mark is not None:
            _touch(lambda: mark)
    finally:
        if lock is not None:
            lock.close()


def _compile_in_children(progress) -> None:
    parts = max(1, min(os.cpu_count() or 1, 4))
    total = sum(len(v) for v in signatures().values())
    with contextlib.ExitStack() as stack:
        errs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(parts)]
        child = module_command(sys.executable, "edgert.jit")
        procs = [
            subprocess.Popen([*child, str(i), str(parts)], stdout=subprocess.PIPE, stderr=e, text=True)
            for i, e in enumerate(errs)
        ]
        done = 0
        # each child prints a line per specialization; reading them in turn is enough, as the
        # parts are about equal and a full pipe only pauses a child
        for p in procs:
            with p.stdout:
                for _ in p.stdout:
                    done += 1
                    if progress:
                        progress("compiling kernels (once, after an install)", done, total)
        for p, e in zip(procs, errs, strict=True):
            if p.wait() != 0:
                e.seek(0)
                err = e.read().strip()
                last = err.splitlines()[-1] if err else f"exit status {p.returncode}"
                raise CompileError(f"compiling edgert's kernels failed: {last}")


if __name__ == "__main__":  # a child of ensure_compiled: python -m edgert.jit PART PARTS
    compile_kernels(int(sys.argv[1]), int(sys.argv[2]), lambda what, done, total: print(done, flush=True))
