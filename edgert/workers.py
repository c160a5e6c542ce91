"""Benchmark workers: one measurement per fresh process, its result the JSON on the last line
of its stdout. `edgert bench`, the streaming benchmark and the perplexity comparison all run
their workers (edgert's, and llama.cpp's under another interpreter) through `run_worker`.

Standard library only: the llama.cpp side runs these files by path under an interpreter
that may not have edgert installed.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any


class WorkerError(Exception):
    """A worker failed, timed out, or printed no result; the message says which."""


def module_command(python: str, module: str) -> list[str]:
    """`python -m module`, except that the current directory is not searched first: started
    from a checkout's root, `-m` would import the checkout's edgert/ folder, which lacks the
    quant, offload and apps subpackages that an install maps into the package."""
    run = "import runpy, sys; del sys.path[0]; "  # -c puts the current directory first
    run += f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return [python, "-c", run]


def worker_command(python: str, path: str | None = None, module: str | None = None) -> list[str]:
    """The command that runs a worker: `module` as with `python -m` (`module_command`), or the
    file at `path` as __main__ (isolated, so it does not see this checkout's edgert under an
    interpreter without it)."""
    if module is not None:
        return module_command(python, module)
    return [python, "-I", "-c", f"import runpy; runpy.run_path({path!r}, run_name='__main__')"]


def run_worker(
    cmd: list[str],
    spec: Any,
    timeout: float,
    *,
    stdin: bool = False,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Any:
    """Run `cmd` with `spec` as JSON (its last argument, or its standard input) and return the
    JSON on the last line of its stdout.

    Raises:
        WorkerError: it timed out, exited non-zero, or printed nothing; with its last stderr lines.
    """
    payload = json.dumps(spec)
    try:
        r = subprocess.run(
            cmd if stdin else [*cmd, payload],
            input=payload if stdin else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            preexec_fn=preexec_fn,
        )
    except subprocess.TimeoutExpired:
        raise WorkerError(f"no result within {timeout:.0f} s") from None
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise WorkerError(" | ".join(r.stderr.strip().splitlines()[-3:]) or f"exit status {r.returncode}")
    return json.loads(lines[-1])
