"""Run records: one ``record.json`` per job, written atomically; config hashing; skip-if-complete;
one process per run directory (DESIGN.md §3.3).

Analysis reads records only. A record is written once, at the end of a successful job, so a
directory either holds a complete record or none; failed or killed jobs never leave a partial one.
A record that is unreadable all the same (a disk filled up, a hand edit) is moved aside, named in
a warning, and its job runs again.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from kv_latent.config import recipe_name
from kv_latent.files import atomic_write_json
from kv_latent.rope import rope_as_run

log = logging.getLogger(__name__)

RECORD_FILE = "record.json"
LOCK_FILE = ".lock"
HOLDER_FILE = "holder.json"  # who holds the lock: a waiting launch names it
RECORD_VERSION = 1
# Config sections that change results; logging, devices and paths do not (they are not hashed).
HASHED_SECTIONS = ("model", "kv", "rope", "gqa", "train", "data", "eval")
UNHASHED_KEYS = {"data": ("cache_dir",)}
PACKAGES = ("kv-latent", "torch", "transformers", "lightning", "peft", "lm_eval", "wandb", "hydra-core")


def config_hash(config: dict[str, Any], sections: tuple[str, ...] = HASHED_SECTIONS) -> str:
    """A short stable hash of the result-relevant ``sections`` of a resolved config."""
    relevant = {}
    for section in sections:
        values = dict(config.get(section) or {})
        for key in UNHASHED_KEYS.get(section, ()):
            values.pop(key, None)
        relevant[section] = values
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def run_name(config: dict[str, Any]) -> str:
    """A stable, readable directory name from the job's values plus its config hash.

    A dim initialised otherwise than by the paper's stride names its init: ``k32-qk_energy_v32-pca``
    (``k32_v32`` for strided ones, and for records from before the inits were choices); the RoPE is
    the one that runs (:func:`rope_label`); compressed heads name their count, ``rope_pca-kv2``; a
    job without retraining is ``surgery``.
    """
    kv, gqa, train = config["kv"], config["gqa"], config["train"]

    def dim(prefix: str, key: str, init_key: str) -> str:
        init = kv.get(init_key, "strided")
        return f"{prefix}{kv[key]}" + ("" if init == "strided" else f"-{init}")

    return (
        f"{config['model']['name']}/{dim('k', 'k_dim', 'qk_init')}_{dim('v', 'v_dim', 'vo_init')}_{rope_label(config)}"
        f"_{gqa_name(gqa)}_{recipe_name(train['stages'])}-{config_hash(config)}"
    )


def rope_label(config: dict[str, Any]) -> str:
    """The RoPE a job's student runs (:func:`kv_latent.rope.rope_as_run`), from its resolved config:
    a (64, 32) job asking ``rope=freq_aware`` without ``rope.at_full_dim`` runs ``standard``."""
    kv, rope = config["kv"], config["rope"]
    return rope_as_run(rope["schedule"], k_dim=kv["k_dim"], head_dim=config["model"]["head_dim"],
                       at_full_dim=rope.get("at_full_dim", False), own_frequencies=kv.get("qk_init") == "qk_energy")


def gqa_name(gqa: dict[str, Any]) -> str:
    """The head-compression part of a run name: ``keep``, or the mode and KV heads, ``svd_a-kv2``
    (``rope_pca-kv2-qa`` when query-aware)."""
    kv_heads = gqa.get("kv_heads")
    if kv_heads is None:
        return gqa["mode"]
    return f"{gqa['mode']}-kv{kv_heads}" + ("-qa" if gqa.get("query_aware") else "")


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


class CorruptRecord(ValueError):
    """A ``record.json`` that is not a readable record; the message names the file."""


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The record in ``run_dir``, or None if there is none; :class:`CorruptRecord` if unreadable."""
    path = Path(run_dir) / RECORD_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptRecord(f"{path} is not valid JSON ({err})") from err
    if not isinstance(record, dict) or "config_hash" not in record or "metrics" not in record:
        raise CorruptRecord(f"{path} is not a kv-latent record (no config_hash or metrics)")
    return record


def set_aside(run_dir: Path) -> Path:
    """Move an unreadable ``record.json`` aside (``record.json.corrupt-<time>``); return the new path."""
    path = Path(run_dir) / RECORD_FILE
    aside = path.with_name(f"{RECORD_FILE}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


def complete_record(run_dir: Path, expected_hash: str) -> dict[str, Any] | None:
    """The complete record of a job with this config hash in ``run_dir``, or None.

    A corrupt record is moved aside with a warning naming both files, so that the job reruns.
    """
    try:
        record = read_record(run_dir)
    except CorruptRecord as err:
        log.warning("%s; moved it to %s and running the job again", err, set_aside(run_dir))
        return None
    if record and record.get("status") == "complete" and record.get("config_hash") == expected_hash:
        return record
    return None


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "user": getpass.getuser(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe_holder(run_dir: Path) -> str:
    """Who holds ``run_dir``'s lock, as its holder file says (best effort)."""
    try:
        h = json.loads((Path(run_dir) / HOLDER_FILE).read_text())
        return f"pid {h['pid']} on {h['host']} (user {h['user']}, since {h['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process: one training, one record, one ``metrics.csv``.

    A second launch of the same job waits, naming the holder, until the first one ends (and will
    then find its record complete). The lock is an OS file lock (``filelock``), released by the
    kernel when its holder dies, so a killed job's lock is taken over at once; the holder file it
    leaves behind is reported and replaced.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("%s is being run by %s; waiting for it to finish", run_dir, describe_holder(run_dir))
        lock.acquire()
    try:
        if (run_dir / HOLDER_FILE).exists():
            log.warning("taking over %s from %s, which ended without releasing it", run_dir, describe_holder(run_dir))
        atomic_write_json(run_dir / HOLDER_FILE, _holder())
        yield
    finally:
        (run_dir / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def write_record(
    run_dir: Path,
    *,
    config: dict[str, Any],
    metrics: dict[str, Any],
    code: dict[str, Any],
    name: str | None = None,
    hashed: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Assemble and atomically write the job's record; return it. ``code`` is :func:`git_commit`
    as read when the job started (the tree may change while a sweep runs). ``name`` and
    ``hashed`` (the config hash) default to those of an ablation job."""
    record = {
        "record_version": RECORD_VERSION,
        "status": "complete",
        "name": name or run_name(config),
        "config": config,
        "config_hash": hashed or config_hash(config),
        "code": code,
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": metrics,
        **fields,
    }
    atomic_write_json(Path(run_dir) / RECORD_FILE, record)
    return record
