"""Run records (or W&B runs) -> one tidy DataFrame: one row per retrained student.

Column names are the record's own names, so a table column reads like the record field it came from:

- the resolved config, flattened without its ``config.`` prefix: ``model.name``, ``kv.k_dim``,
  ``kv.v_dim``, ``rope.schedule``, ``train.stages`` (joined by ``+``), ...; ``recipe`` is the
  stages as run names show them (``surgery`` for none);
- every metric key as written: ``val/ppl``, ``eval/<task>/<metric>``, ``needle/mean``, ...;
- the record's ``kv`` field: ``kv.bytes_per_token``, ``kv.original_bytes_per_token``, ``kv.ratio``;
- ``rope_as_run``: the RoPE schedule the student's layers ran (:func:`rope_as_run`), which is what
  tables and figures show, not the ``rope.schedule`` asked for;
- ``items``: the record's per-item 0/1 scores (``{metric key: [score per eval item]}``), if any;
- provenance: ``name``, ``config_hash``, ``code.commit``, ``code.dirty``, ``created``, ``source``
  (the record file or W&B run path) and ``run_dir`` (where ``metrics.csv`` lives, if anywhere).

A key absent from a record is a missing cell (NaN), never a filled-in value. :func:`seed_cells`
merges the records that differ only in ``train.seed`` into one cell with the spread of every metric
and bootstrap intervals over eval items (:mod:`analysis.stats`); :func:`with_originals` adds one row
per model for the original (teacher) model, from the records' ``original/...`` metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.stats import AT_CHANCE, CI_HI, CI_LO, COMPANIONS, DDOF, N, STD, at_chance, chance_key, interval
from kv_latent.config import recipe_name
from kv_latent.records import (HASHED_SECTIONS, RECORD_FILE, UNHASHED_KEYS, CorruptRecord, config_hash, read_record,
                               rope_label)

log = logging.getLogger(__name__)

ORIGINAL = "original"  # the `recipe` of original-model rows
ORIGINAL_PREFIX = "original/"
ORIGINAL_ROPE = "standard"  # the teacher runs its own RoPE: no key dim is cut
# Columns naming the record an artefact used (written to every artefact's sources).
SOURCE_COLUMNS = ["config_hash", "code.commit", "code.dirty", "name", "source"]
# Top-level record fields copied to each row.
RECORD_FIELDS = ("name", "config_hash", "created", "tokens_trained", "pretrain_fraction", "wall_time_s", "device")
# Fields of one run, not of its config: they differ between the seeds of a cell.
PER_RUN = (*RECORD_FIELDS, "code.commit", "code.dirty", "source", "run_dir")
SEED = "train.seed"
ITEMS = "items"
# The record's own ``kv`` field (cache accounting), as opposed to the ``kv`` config section.
KV_FIELDS = ("kv.bytes_per_token", "kv.original_bytes_per_token", "kv.ratio")
# The per-step training log Lightning's CSVLogger writes beside each record.
METRICS_CSV = "metrics.csv"


@dataclass
class Runs:
    """The loaded runs: ``frame`` (one row per student record) and the training ``curves``
    (per-step logs keyed by config hash; only for runs that have one)."""

    frame: pd.DataFrame
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)

    @cached_property
    def cells(self) -> pd.DataFrame:
        """The records merged over training seeds (:func:`seed_cells`); bootstrapped once."""
        return seed_cells(self.frame)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys; lists become ``+``-joined strings (``train.stages``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = "+".join(str(v) for v in value)
        else:
            flat[name] = value
    return flat


def record_row(record: Mapping[str, Any], *, source: str, run_dir: str | None) -> dict[str, Any]:
    """One DataFrame row from a record (or a record-shaped dict built from a W&B run)."""
    row = flatten(record.get("config") or {})
    row.update({k: v for k, v in (record.get("metrics") or {}).items() if _is_scalar(v)})
    row.update({f"kv.{k}": v for k, v in (record.get("kv") or {}).items()})
    for key in RECORD_FIELDS:
        row[key] = record.get(key)
    row["rope_as_run"], row[ITEMS] = rope_as_run(record), record.get(ITEMS)
    code = record.get("code") or {}
    row["code.commit"], row["code.dirty"] = code.get("commit"), code.get("dirty")
    stages = ((record.get("config") or {}).get("train") or {}).get("stages")
    row["recipe"] = None if stages is None else recipe_name(stages)
    row["source"], row["run_dir"] = source, run_dir
    return row


def rope_as_run(record: Mapping[str, Any]) -> str | None:
    """The RoPE the student's layers ran: the record's ``rope_as_run`` where it has one, else the
    job code's rule on its config (:func:`kv_latent.records.rope_label`: a (64, 32) job with
    ``rope=freq_aware rope.at_full_dim=false`` ran standard RoPE; DESIGN.md §2.2); None for a record
    without a RoPE schedule (a W&B run without the config)."""
    if record.get("rope_as_run") is not None:
        return record["rope_as_run"]
    config = record.get("config") or {}
    if (config.get("rope") or {}).get("schedule") is None:
        return None
    return rope_label(config)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (Number, str, bool))


def find_records(roots: Iterable[Path]) -> list[Path]:
    """Every ``record.json`` under the given directories (or the files themselves), sorted."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if root.is_file():
            found.add(root.resolve())
        elif root.is_dir():
            found.update(p.resolve() for p in root.rglob(RECORD_FILE))
        else:
            log.warning("no such records directory: %s", root)
    return sorted(found)


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame, one row per config hash (the newest record wins), in a stable order."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.sort_values("created", na_position="first", kind="stable")
    duplicated = frame["config_hash"].duplicated(keep="last")
    for _, dup in frame[duplicated].iterrows():
        log.warning("config %s has several records; using the newest, not %s", dup["config_hash"], dup["source"])
    frame = frame[~duplicated]
    order = ["model.name", "kv.k_dim", "kv.v_dim", "rope_as_run", "recipe", "config_hash"]
    by = [c for c in order if c in frame]
    ascending = [c not in ("kv.k_dim", "kv.v_dim") for c in by]
    return frame.sort_values(by, ascending=ascending, kind="stable").reset_index(drop=True)


def read_curve(run_dir: Path) -> pd.DataFrame | None:
    """The per-step training log (``metrics.csv``) of a run, or None if it has none."""
    path = Path(run_dir) / METRICS_CSV
    return pd.read_csv(path) if path.exists() else None


def load_records(roots: Iterable[Path]) -> Runs:
    """Load every complete ``record.json`` under ``roots`` and the ``metrics.csv`` beside it."""
    rows, curves = [], {}
    for path in find_records(roots):
        try:
            record = read_record(path.parent)
        except CorruptRecord as err:
            log.warning("skipping %s", err)
            continue
        if record.get("status") != "complete":
            log.warning("skipping %s: status %r", path, record.get("status"))
            continue
        rows.append(record_row(record, source=_shown(path), run_dir=str(path.parent)))
        curve = read_curve(path.parent)
        if curve is not None:
            curves[record["config_hash"]] = curve
    return Runs(to_frame(rows), curves)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when under it (artefacts name no home dirs)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def wandb_record(run: Any) -> dict[str, Any]:
    """A record-shaped dict from a W&B run: ``run.config`` is the resolved config, ``run.summary``
    the metrics (``kv/<field>`` summary keys stand for the record's ``kv`` field). The flat dashboard
    fields a job adds to its run's config (:func:`kv_latent.tracking.run_fields`) are left out: the
    nested config holds them all."""
    config = {k: v for k, v in run.config.items() if "." not in k and k != "config_hash"}
    summary = {k: run.summary[k] for k in run.summary.keys() if not k.startswith("_")}
    kv = {k.split("/", 1)[1]: summary.pop(k) for k in list(summary) if k.startswith("kv/")}
    git = (getattr(run, "metadata", None) or {}).get("git") or {}
    return {
        "name": run.name,
        "config": config,
        "config_hash": config_hash(config),
        "code": {"commit": git.get("commit"), "dirty": None},
        "created": getattr(run, "created_at", None),
        "metrics": summary,
        "kv": kv,
    }


def load_wandb(path: str, *, api: Any = None) -> Runs:
    """Load the runs of W&B project ``ENTITY/PROJECT`` (the same fields as records) and their
    training curves from the run history."""
    if api is None:
        import wandb

        api = wandb.Api()
    rows, curves = [], {}
    for run in api.runs(path):
        if getattr(run, "state", "finished") != "finished":
            continue
        record = wandb_record(run)
        rows.append(record_row(record, source=f"wandb:{path}/{run.id}", run_dir=None))
        history = run.history(pandas=True)
        if history is not None and len(history):
            curves[record["config_hash"]] = history
    return Runs(to_frame(rows), curves)


def config_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that come from result-relevant config sections (those the config hash covers)."""
    return [c for c in frame.columns if "." in c and c.split(".", 1)[0] in HASHED_SECTIONS and c not in KV_FIELDS]


def signature(frame: pd.DataFrame, *, exclude: Iterable[str] = ()) -> pd.Series:
    """Per row, every result-relevant config value except the ``exclude`` keys (and the keys the
    config hash ignores), as one string: rows with equal signatures differ only in ``exclude``."""
    skipped = set(exclude) | {f"{section}.{k}" for section, keys in UNHASHED_KEYS.items() for k in keys}
    columns = [c for c in config_columns(frame) if c not in skipped]
    return frame[columns].map(str).agg("|".join, axis=1)


def _agreed(values: pd.Series) -> Any:
    """The single value all records give, or NaN (with a warning) when they disagree."""
    distinct = values.dropna().unique()
    if len(distinct) > 1 and not all(isinstance(v, Number) and math.isclose(v, distinct[0], rel_tol=1e-9) for v in distinct):
        log.warning("records disagree on %s (%s); the original's cell stays missing", values.name, list(distinct))
        return math.nan
    return distinct[0] if len(distinct) else math.nan


def original_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model for the original model, from the ``original/...`` metrics of its records.

    Its ``kv.k_dim`` and ``kv.v_dim`` are the model's ``head_dim``, its recipe ``original``, its
    KV bytes the records' ``kv.original_bytes_per_token`` (so ``kv.ratio`` is 1 by definition).
    Its ``config_hash`` is empty: the row stands for every record of the model.
    """
    originals = [c for c in frame.columns if c.startswith(ORIGINAL_PREFIX)]
    rows = []
    for model, group in frame.groupby("model.name", sort=True):
        row = {c[len(ORIGINAL_PREFIX):]: _agreed(group[c]) for c in originals}
        head_dim = _agreed(group["model.head_dim"]) if "model.head_dim" in group else math.nan
        row.update({"model.name": model, "kv.k_dim": head_dim, "kv.v_dim": head_dim, "recipe": ORIGINAL,
                    "rope_as_run": ORIGINAL_ROPE})
        if "kv.original_bytes_per_token" in group:
            row["kv.bytes_per_token"] = _agreed(group["kv.original_bytes_per_token"])
            row["kv.ratio"] = 1.0 if pd.notna(row["kv.bytes_per_token"]) else math.nan
        row["name"] = f"{model}/{ORIGINAL}"
        rows.append(row)
    return pd.DataFrame(rows)


def with_originals(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` plus the original-model rows, each model's original first."""
    if frame.empty:
        return frame
    both = pd.concat([original_rows(frame), frame], ignore_index=True).copy()  # copy: one block, not fragments
    both = both.assign(_original=both["recipe"] != ORIGINAL).sort_values(["model.name", "_original"], kind="stable")
    return both.drop(columns="_original").reset_index(drop=True)


def seed_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the records equal in every result-relevant config key but ``train.seed``.

    Each metric (a ``split/name`` column) becomes the mean over the cell's seeds -- missing unless
    every seed has it, so ``n`` counts the seeds behind every number of the row -- and ``<metric>_std``
    their standard deviation (``ddof`` = 1: missing for one seed). The config, the cache accounting
    and the original model's metrics are the same for every seed and kept as they are; the per-run
    fields are dropped but ``config_hash``, which joins the cell's hashes with ``+`` (the records
    behind a cell: :func:`members`). ``items`` becomes, per item key every seed has, a (seeds, items)
    array, and gives each key its bootstrap interval (``_ci_lo``, ``_ci_hi``) and, for an accuracy
    whose task has a chance rate, ``_at_chance``.
    """
    if frame.empty:
        return frame
    grouped = frame.groupby(signature(frame, exclude=[SEED]), sort=False)
    size = grouped.size()
    spread = [c for c in frame.columns if "/" in c and not c.startswith(ORIGINAL_PREFIX)
              and pd.api.types.is_numeric_dtype(frame[c])]
    kept = [c for c in frame.columns if c not in {*spread, *PER_RUN, SEED, ITEMS}]
    complete = grouped[spread].count().eq(size, axis=0)
    cells = pd.concat([grouped[kept].first(), grouped[spread].mean().where(complete),
                       grouped[spread].std(ddof=DDOF).where(complete).add_suffix(STD), size.rename(N),
                       grouped["config_hash"].agg("+".join)], axis=1)
    if ITEMS in frame:
        cells[ITEMS] = pd.Series([stacked(g.tolist()) for _, g in grouped[ITEMS]], index=size.index)
        scores = pd.DataFrame([item_intervals(row) for _, row in cells.iterrows()], index=cells.index)
        cells = cells.join(scores)
    return cells.reset_index(drop=True)


def stacked(items: list[Any]) -> dict[str, np.ndarray]:
    """The per-item scores of a cell's seeds: per key that every seed has, a (seeds, items) array.
    Nothing when a seed has no items; a key whose seeds scored different item counts is dropped with
    a warning (they did not see the same items)."""
    if not all(isinstance(seed, Mapping) for seed in items):
        return {}
    cell = {}
    for key in sorted(set.intersection(*(set(seed) for seed in items))):
        if len({len(seed[key]) for seed in items}) > 1:
            log.warning("the seeds of a cell scored different numbers of %s items; no interval", key)
            continue
        cell[key] = np.array([seed[key] for seed in items], dtype=float)  # (seeds, items)
    return cell


def item_intervals(cell: pd.Series) -> dict[str, Any]:
    """A cell's bootstrap interval for every item key, and whether an accuracy's interval contains
    the chance rate of its task (``eval/<task>/chance``, where the record gives one)."""
    scores = {}
    for key, matrix in cell[ITEMS].items():
        low, high = interval(matrix)
        scores[key + CI_LO], scores[key + CI_HI] = low, high
        rate = chance_key(key)
        chance = cell.get(rate) if rate else None
        if chance is not None and pd.notna(chance):
            scores[key + AT_CHANCE] = at_chance(low, high, chance)
    return scores


def members(frame: pd.DataFrame, config_hashes: Iterable[Any]) -> pd.DataFrame:
    """The records of ``frame`` behind cells, given the cells' ``config_hash`` values (each joins its
    records' hashes; missing ones, such as the original model's, stand for no record)."""
    hashes = {h for joined in config_hashes if isinstance(joined, str) for h in joined.split("+")}
    return frame[frame["config_hash"].isin(hashes)]


def with_companions(frame: pd.DataFrame, metrics: Iterable[str]) -> list[str]:
    """``metrics``, each followed by those of its companion columns (std, interval, at chance, ...)
    that ``frame`` has: the columns a table needs to show the metric with its uncertainty."""
    return [c for m in metrics for c in (m, *(m + suffix for suffix in COMPANIONS)) if c == m or c in frame]
