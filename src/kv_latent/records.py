"""Run records: one ``record.json`` per job, written atomically; config hashing; skip-if-complete.

Analysis reads records only. A record is written once, at the end of a successful job, so a
directory either holds a complete record or none; failed or killed jobs never leave a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_FILE = "record.json"
RECORD_VERSION = 1
# Config sections that change results; logging, devices and paths do not (they are not hashed).
HASHED_SECTIONS = ("model", "kv", "rope", "gqa", "train", "data", "eval")
UNHASHED_KEYS = {"data": ("cache_dir",)}
PACKAGES = ("kv-latent", "torch", "transformers", "lightning", "peft", "lm_eval", "wandb", "hydra-core")


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of the result-relevant part of a resolved config."""
    relevant = {}
    for section in HASHED_SECTIONS:
        values = dict(config.get(section) or {})
        for key in UNHASHED_KEYS.get(section, ()):
            values.pop(key, None)
        relevant[section] = values
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def run_name(config: dict[str, Any]) -> str:
    """A stable, readable directory name from the job's values plus its config hash."""
    kv, rope, gqa, train = config["kv"], config["rope"], config["gqa"], config["train"]
    return (
        f"{config['model']['name']}/k{kv['k_dim']}_v{kv['v_dim']}_{rope['schedule']}"
        f"_{gqa['mode']}_{'+'.join(train['stages'])}-{config_hash(config)}"
    )


def git_commit(repo: Path | None = None) -> dict[str, Any]:
    """The code version: commit hash and whether the work tree had uncommitted changes.

    Where the code runs from a copy without ``.git`` (a remote machine), ``$KV_LATENT_GIT_COMMIT``
    names the commit the copy was made from.
    """
    repo = repo or Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None and os.environ.get("KV_LATENT_GIT_COMMIT"):
        return {"commit": os.environ["KV_LATENT_GIT_COMMIT"], "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so readers see either the old file or the complete new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The record in ``run_dir``, or None if there is none."""
    path = Path(run_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.exists() else None


def is_complete(run_dir: Path, expected_hash: str) -> bool:
    """True when ``run_dir`` holds a complete record of a job with this config hash."""
    record = read_record(run_dir)
    return bool(record and record.get("status") == "complete" and record.get("config_hash") == expected_hash)


def write_record(
    run_dir: Path, *, config: dict[str, Any], metrics: dict[str, Any], code: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """Assemble and atomically write the job's record; return it. ``code`` is :func:`git_commit`
    as read when the job started (the tree may change while a sweep runs)."""
    record = {
        "record_version": RECORD_VERSION,
        "status": "complete",
        "name": run_name(config),
        "config": config,
        "config_hash": config_hash(config),
        "code": code,
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": metrics,
        **fields,
    }
    atomic_write_json(Path(run_dir) / RECORD_FILE, record)
    return record
