"""Artefacts and their writers: tables as Markdown/LaTeX/CSV, figures as PNG/PDF, each with the
list of records it used (``<name>.sources.csv`` beside a table, a ``<name>.json`` sidecar beside a
figure, holding the sources and the plotted numbers).

CSV files hold the record values unchanged, under the record's own key names; Markdown and LaTeX
show the same cells formatted for reading (fractions as %, ratios as % change), with the unit in
the header. A metric's companion columns (:mod:`analysis.stats`: ``_std``, ``_se``, ``_ci_lo``,
``_ci_hi``, ``_at_chance``) are CSV columns of their own and fold into the metric's cell in
Markdown/LaTeX: ``37.0 ± 1.0``, ``41.2 [38.1, 44.3]``, ``25.3 [22.6, 28.0] at chance``. A missing
cell is empty in CSV and a dash in Markdown/LaTeX.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.frame import SOURCE_COLUMNS  # noqa: E402
from analysis.stats import AT_CHANCE, CI_HI, CI_LO, COMPANIONS, SE, STD  # noqa: E402

MISSING_MD, MISSING_TEX = "–", "--"
# A metric under a prefix keeps its unit: the student before retraining (``surgery/``), a K-versus-V
# arm (``cut_k/``, ``cut_v/``) and a difference of two (``diff/``).
PREFIX = r"^((surgery|cut_k|cut_v|diff)/)?"
# Fractions shown as percentages: accuracies (and their stderr), needle success, KV share.
PERCENT = re.compile(PREFIX + r"(eval/.+/acc(_norm)?(_stderr)?|needle/.+|benchmark_avg|kv\.ratio|efficiency/kv_bytes_ratio)$")
# Ratios to the original shown as signed % change (the paper's "TTFT -8%"), and their quartiles.
CHANGE = re.compile(PREFIX + r"efficiency/(ttft|ms_per_token)_ratio(_p25|_p75)?$")
# How the header names each companion folded into a cell.
FOLDED = {STD: "± std", SE: "± se", CI_LO: "[95% CI]"}


@dataclass
class Table:
    """A table: raw values under record-key column names, a caption, and the records it used."""

    name: str
    frame: pd.DataFrame
    caption: str
    sources: pd.DataFrame
    notes: list[str] = field(default_factory=list)  # footnotes: what a reader must know about some cells


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


def header(column: str, columns: Collection[str] = ()) -> str:
    """The Markdown/LaTeX header of a column: its record key plus the unit it is shown in and the
    companions (among ``columns``) folded into its cells."""
    units = ["%"] if PERCENT.match(column) else ["Δ%"] if CHANGE.match(column) else []
    units += [name for suffix, name in FOLDED.items() if column + suffix in columns]
    return f"{column} ({', '.join(units)})" if units else column


def is_companion(column: str, columns: Collection[str]) -> bool:
    """Whether ``column`` is the std, interval, ... of another of ``columns`` (folded into its cell)."""
    return any(column.endswith(suffix) and column[: -len(suffix)] in columns for suffix in COMPANIONS)


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, str) and pd.isna(value))


def places_for(spread: float) -> int | None:
    """Decimal places that show a spread to two significant digits (None for a zero spread)."""
    if spread == 0:
        return None
    return min(6, max(0, 1 - math.floor(math.log10(abs(spread)))))


def number(column: str, value: float, places: int | None = None) -> str:
    """One number as read: a fraction in %, a ratio as signed % change (both 1 decimal), else
    ``places`` decimals or, without them, an integer or 4 significant digits."""
    if PERCENT.match(column):
        return f"{100 * value:.1f}"
    if CHANGE.match(column):
        return f"{100 * (value - 1):+.1f}"
    if places is not None:
        return f"{value:.{places}f}"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def spread(column: str, value: float, places: int | None) -> str:
    """A std or standard error in its column's unit (% points for fractions and ratios)."""
    if PERCENT.match(column) or CHANGE.match(column):
        return f"{100 * value:.1f}"
    return f"{value:.{places}f}" if places is not None else f"{value:.2g}"


def cell(column: str, row: dict[str, Any], missing: str) -> str:
    """The cell of ``column`` in ``row`` formatted for reading, with the companions ``row`` has:
    ``mean ± std`` (or ``± se``), ``[low, high]`` (bootstrap interval), ``at chance``; ``missing``
    for an absent value."""
    value = row.get(column)
    if _missing(value):
        return missing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    deviation = next((row[column + s] for s in (STD, SE) if not _missing(row.get(column + s))), None)
    places = None if deviation is None else places_for(deviation)
    text = number(column, value, places)
    if deviation is not None:
        text += f" ± {spread(column, deviation, places)}"
    low, high = row.get(column + CI_LO), row.get(column + CI_HI)
    if not (_missing(low) or _missing(high)):
        text += f" [{number(column, low, places)}, {number(column, high, places)}]"
    flag = row.get(column + AT_CHANCE)
    if not _missing(flag) and bool(flag):
        text += " at chance"
    return text


def formatted(frame: pd.DataFrame, missing: str) -> pd.DataFrame:
    """``frame`` as strings for reading: companions folded into their metric's cell, unit-bearing headers."""
    shown = [c for c in frame.columns if not is_companion(c, frame.columns)]
    rows = frame.to_dict("records")
    return pd.DataFrame({header(c, frame.columns): [cell(c, row, missing) for row in rows] for c in shown})


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
    md = formatted(table.frame, MISSING_MD).to_markdown(index=False, disable_numparse=True)  # cells as formatted
    notes = "".join(f"{n}\n\n" for n in table.notes)
    paths[0].write_text(f"{table.caption}\n\n{md}\n\n{notes}{note}\n")
    caption = " ".join([table.caption, *table.notes])
    tex = formatted(table.frame, MISSING_TEX).to_latex(
        index=False, escape=True, caption=latex_escape(caption), label=f"tab:{table.name}"
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
