"""Artefacts and their writers: tables as Markdown/LaTeX/CSV, figures as PNG/PDF, each with the
list of records it used (``<name>.sources.csv`` beside a table, a ``<name>.json`` sidecar beside a
figure, holding the sources and the plotted numbers).

CSV files hold the record values unchanged, under the record's own key names; Markdown and LaTeX
show the same cells formatted for reading (fractions as %, ratios as % change), with the unit in
the header. A missing cell is empty in CSV and a dash in Markdown/LaTeX.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.frame import SOURCE_COLUMNS  # noqa: E402

MISSING_MD, MISSING_TEX = "–", "--"
# Fractions shown as percentages: accuracies (and their stderr), needle success, KV share.
PERCENT = re.compile(r"^(eval/.+/acc(_norm)?(_stderr)?|(surgery/)?needle/.+|benchmark_avg|kv\.ratio|efficiency/kv_bytes_ratio)$")
# Ratios to the original shown as signed % change (the paper's "TTFT -8%").
CHANGE = re.compile(r"^efficiency/(ttft|ms_per_token)_ratio$")


@dataclass
class Table:
    """A table: raw values under record-key column names, a caption, and the records it used."""

    name: str
    frame: pd.DataFrame
    caption: str
    sources: pd.DataFrame


@dataclass
class Figure:
    """A figure, its caption, the records it used and the numbers it plots (for the sidecar)."""

    name: str
    figure: matplotlib.figure.Figure
    caption: str
    sources: pd.DataFrame
    data: dict[str, Any] = field(default_factory=dict)


def sources_of(*frames: pd.DataFrame) -> pd.DataFrame:
    """The provenance rows (config hash, commit, dirty, name, source) of the records in ``frames``;
    rows without a config hash (original-model rows) add nothing of their own."""
    rows = pd.concat([f.reindex(columns=SOURCE_COLUMNS) for f in frames], ignore_index=True)
    rows = rows.dropna(subset=["config_hash"]).drop_duplicates("config_hash")
    return rows.sort_values("config_hash").reset_index(drop=True)


def header(column: str) -> str:
    """The Markdown/LaTeX header of a column: its record key plus the unit it is shown in."""
    if PERCENT.match(column):
        return f"{column} (%)"
    if CHANGE.match(column):
        return f"{column} (Δ%)"
    return column


def cell(column: str, value: Any, missing: str) -> str:
    """One cell formatted for reading; ``missing`` for an absent value."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return missing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if PERCENT.match(column):
        return f"{100 * value:.1f}"
    if CHANGE.match(column):
        return f"{100 * (value - 1):+.1f}"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def formatted(frame: pd.DataFrame, missing: str) -> pd.DataFrame:
    """``frame`` as strings for reading, with unit-bearing headers."""
    return pd.DataFrame({header(c): [cell(c, v, missing) for v in frame[c].tolist()] for c in frame.columns})


def footnote(sources: pd.DataFrame, name: str) -> str:
    """A one-line provenance note: how many records, at which commits, where the full list is."""
    if sources.empty:
        return "Sources: no run records (computed, not measured)."
    commits = sorted({str(c)[:10] + ("+dirty" if d is True else "") for c, d in zip(sources["code.commit"], sources["code.dirty"])})
    return f"Sources: {len(sources)} run records at commit(s) {', '.join(commits)}; config hashes in {name}.sources.csv."


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (pandas escapes cells, not captions)."""
    return re.sub(r"([&%$#_{}])", r"\\\1", text)


def write_table(table: Table, out: Path) -> list[Path]:
    """Write ``<name>.md``, ``.tex``, ``.csv`` and ``.sources.csv`` under ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    note = footnote(table.sources, table.name)
    paths = [out / f"{table.name}.{ext}" for ext in ("md", "tex", "csv")] + [out / f"{table.name}.sources.csv"]
    md = formatted(table.frame, MISSING_MD).to_markdown(index=False)
    paths[0].write_text(f"{table.caption}\n\n{md}\n\n{note}\n")
    tex = formatted(table.frame, MISSING_TEX).to_latex(
        index=False, escape=True, caption=latex_escape(table.caption), label=f"tab:{table.name}"
    )
    paths[1].write_text(f"% {note}\n{tex}")
    table.frame.to_csv(paths[2], index=False)
    table.sources.to_csv(paths[3], index=False)
    return paths


def write_figure(figure: Figure, out: Path) -> list[Path]:
    """Write ``<name>.png``, ``.pdf`` and the ``.json`` sidecar under ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{figure.name}.{ext}" for ext in ("png", "pdf", "json")]
    figure.figure.savefig(paths[0], dpi=150, bbox_inches="tight")
    figure.figure.savefig(paths[1], bbox_inches="tight")
    sidecar = {
        "name": figure.name,
        "caption": figure.caption,
        "sources": figure.sources.to_dict("records"),
        "data": figure.data,
    }
    paths[2].write_text(json.dumps(plain(sidecar), indent=2) + "\n")
    plt.close(figure.figure)
    return paths


def plain(value: Any) -> Any:
    """``value`` as strict JSON data: numpy scalars become Python ones, NaN becomes null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
