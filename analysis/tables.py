"""One function per table. Each takes the runs DataFrame (:mod:`analysis.frame`) and returns a
:class:`~analysis.output.Table` (or None when no record holds what it needs).

Rows are identified by ``model.name``, ``kv.k_dim`` (d_qk), ``kv.v_dim`` (d_vo), ``rope.schedule``
and ``recipe`` (``train.stages``, or ``original`` for the original model), plus any other config
key that varies within a model (e.g. ``train.lora_rank`` once a LoRA ablation exists).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch

from analysis.frame import ORIGINAL, config_columns, signature, with_originals
from analysis.output import Table, sources_of
from kv_latent.rope import autocorrelation, inv_freq

KEYS = ["model.name", "kv.k_dim", "kv.v_dim", "rope.schedule", "recipe"]
BENCHMARK = re.compile(r"^eval/[^/]+/acc$")
# The benchmark shown where there is room for only one (K-versus-V table, heatmap), best first.
HEADLINE_BENCHMARKS = ["eval/mmlu/acc", "eval/kvl_mmlu/acc", "eval/arc_easy/acc", "eval/kvl_cloze/acc"]
# RoPE stability (DESIGN.md §2.2): key dims, schedules, base and distances of the paper's figure.
ROPE_DIMS = (128, 64, 32, 16, 8)
ROPE_SCHEDULES = ("standard", "freq_aware")
ROPE_THETA = 1e4
ROPE_DISTANCES = torch.arange(1, 4097)
# The ablations: the config key that differs, and the table it makes.
ABLATIONS = {"rope.schedule": "ablation_rope", "train.stages": "ablation_stages", "train.lora_rank": "ablation_lora"}


def benchmark_columns(frame: pd.DataFrame) -> list[str]:
    """The benchmark accuracy columns (``eval/<task>/acc``) present, in task order."""
    return sorted(c for c in frame.columns if BENCHMARK.match(c))


def headline_benchmark(frame: pd.DataFrame) -> str | None:
    """The one benchmark column to show where there is room for one, or None."""
    present = [c for c in benchmark_columns(frame) if frame[c].notna().any()]
    preferred = [c for c in HEADLINE_BENCHMARKS if c in present]
    return (preferred or present or [None])[0]


def with_average(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` plus ``benchmark_avg``: the mean of the benchmark accuracies, missing unless a
    row has every one of them (an average over fewer tasks would not compare)."""
    frame = frame.copy()
    bench = benchmark_columns(frame)
    frame["benchmark_avg"] = frame[bench].mean(axis=1, skipna=False) if bench else np.nan
    return frame


def varying_keys(frame: pd.DataFrame) -> list[str]:
    """Config keys beyond :data:`KEYS` whose value differs between two records of one model."""
    students = frame[frame["recipe"] != ORIGINAL]
    candidates = [c for c in config_columns(students) if c not in KEYS and c != "train.stages"]
    return [c for c in candidates if (students.groupby("model.name")[c].nunique(dropna=False) > 1).any()]


def _columns(frame: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The identifying keys, the keys that vary, the given metrics and the config hash; a metric
    no record has is kept as an all-missing column so the table keeps its shape."""
    return frame.reindex(columns=[*KEYS, *varying_keys(frame), *metrics, "config_hash"])


def main_table(frame: pd.DataFrame) -> Table:
    """The paper's main table: per model x (d_qk, d_vo) x recipe, benchmarks and their average,
    needle success, KV bytes and share of the original, TTFT change."""
    rows = with_average(with_originals(frame))
    bench = benchmark_columns(rows)
    metrics = ["val/ppl", *bench, "benchmark_avg", "needle/mean", "kv.bytes_per_token", "kv.ratio", "efficiency/ttft_ratio"]
    return Table(
        name="main",
        frame=_columns(rows, metrics),
        caption="Main results per model, (d_qk, d_vo) and recipe (the original model first). benchmark_avg "
        "is the mean of the benchmark accuracies, missing unless all are present; kv.ratio is the KV cache "
        "as a share of the original's; efficiency/ttft_ratio is time to first token relative to the original.",
        sources=sources_of(frame),
    )


def kv_table(frame: pd.DataFrame) -> Table:
    """K versus V: every (d_qk, d_vo) with its cache share, losses before and after retraining and
    the headline benchmark, ordered by cache share so equal-size K-only/V-only cuts sit together."""
    rows = with_originals(frame)
    metrics = ["kv.ratio", "val/loss", "val/ppl", "surgery/val/ppl"]
    bench = headline_benchmark(rows)
    table = _columns(rows, metrics + ([bench] if bench else []))
    table = table.assign(_orig=table["recipe"] != ORIGINAL).sort_values(
        ["model.name", "_orig", "kv.ratio", "kv.k_dim"], ascending=[True, True, False, False], kind="stable"
    )
    return Table(
        name="k_versus_v",
        frame=table.drop(columns="_orig").reset_index(drop=True),
        caption="K versus V: val/loss is the mean NLL (the paper's LogPPL) of the retrained student, "
        "surgery/val/ppl that of the student before retraining. Rows of equal kv.ratio compare cutting "
        "keys (d_qk) against cutting values (d_vo) at the same cache size.",
        sources=sources_of(frame),
    )


def efficiency_table(frame: pd.DataFrame) -> Table | None:
    """Measured efficiency over the grid: TTFT, ms per output token and their ratios to the original."""
    measured = [c for c in frame.columns if c.startswith("efficiency/")]
    if not measured:
        return None
    rows = frame[frame[measured].notna().any(axis=1)]
    metrics = [
        "kv.bytes_per_token",
        "kv.ratio",
        "efficiency/ttft_s",
        "efficiency/ms_per_token",
        "efficiency/ttft_ratio",
        "efficiency/ms_per_token_ratio",
        "efficiency/kv_bytes_ratio",
    ]
    return Table(
        name="efficiency",
        frame=_columns(rows, metrics).reset_index(drop=True),
        caption="Efficiency (batch 1, median of runs): time to first token, ms per output token, and their "
        "ratios to the original model; efficiency/kv_bytes_ratio is the measured cache share, kv.ratio the "
        "analytic one.",
        sources=sources_of(rows),
    )


def rope_curves() -> pd.DataFrame:
    """Expected score of identical vectors ``a(m)`` for m = 1..4096, one column per (schedule, d)."""
    curves = {
        (schedule, d): autocorrelation(inv_freq(schedule, dim=d, theta=ROPE_THETA), ROPE_DISTANCES).numpy()
        for schedule in ROPE_SCHEDULES
        for d in ROPE_DIMS
    }
    return pd.DataFrame(curves, index=pd.Index(ROPE_DISTANCES.numpy(), name="distance"))


def rope_table() -> Table:
    """RoPE stability per key dim and schedule: the minimum of ``a(m)``, where it falls, and the
    share of distances with a negative expected score (pure math, no records)."""
    curves = rope_curves()
    rows = [
        {
            "kv.k_dim": d,
            "rope.schedule": schedule,
            "autocorrelation_min": curves[(schedule, d)].min(),
            "distance_at_min": int(curves[(schedule, d)].idxmin()),
            "share_negative": (curves[(schedule, d)] < 0).mean(),
        }
        for d in ROPE_DIMS
        for schedule in ROPE_SCHEDULES
    ]
    return Table(
        name="rope_stability",
        frame=pd.DataFrame(rows),
        caption=f"RoPE stability: a(m) = (2/d) sum_j cos(m inv_freq_j) for the all-ones vector, theta = "
        f"{ROPE_THETA:g}, m = 1..{len(ROPE_DISTANCES)}.",
        sources=sources_of(pd.DataFrame()),
    )


def ablation_table(frame: pd.DataFrame, key: str) -> Table | None:
    """Records that differ only in config ``key``, side by side; None when there are none."""
    if frame.empty or key not in frame:
        return None
    groups = [g for _, g in frame.groupby(signature(frame, exclude=[key]), sort=False) if g[key].nunique() > 1]
    if not groups:
        return None
    rows = with_average(pd.concat([g.assign(comparison=i) for i, g in enumerate(groups, 1)], ignore_index=True))
    shown = [] if key in KEYS or key == "train.stages" else [key]
    metrics = ["val/loss", "val/ppl", "surgery/val/ppl", *benchmark_columns(rows), "benchmark_avg", "needle/mean"]
    table = rows.reindex(columns=["comparison", *KEYS, *shown, *metrics, "config_hash"])
    return Table(
        name=ABLATIONS[key],
        frame=table,
        caption=f"Ablation of {key}: rows with the same comparison number differ in {key} only.",
        sources=sources_of(rows),
    )


SURGERY = "surgery"  # the recipe of records without retraining
NEEDLE_GRID = ["eval.needle.context_lengths", "eval.needle.depths", "eval.needle.trials"]
# The init ablation (DESIGN.md §2.6): dims, the key arm (init and RoPE), the value init.
INIT_CELL = ["model.name", "kv.k_dim", "kv.v_dim", "kv.qk_init", "rope.schedule", "kv.vo_init", "eval.name"]
INIT_ORDER = {"kv.qk_init": ["strided", "freq_matched", "qk_energy"], "rope.schedule": ["standard", "freq_aware"],
              "kv.vo_init": ["strided", "pca"]}
# Head compression (DESIGN.md §5): the mode, its KV heads and the dims it composes with.
GQA_CELL = ["model.name", "gqa.mode", "gqa.query_aware", "gqa.kv_heads", "kv.k_dim", "kv.v_dim", "kv.qk_init",
            "kv.vo_init", "eval.name"]
GQA_ORDER = {"gqa.mode": ["keep", "mean_pool", "svd_w", "svd_a", "rope_pca"]}


def needle_stderr(frame: pd.DataFrame) -> pd.Series:
    """Standard error of ``needle/mean`` over the n = contexts x depths x trials retrievals of the
    record's needle grid, Agresti-Coull (p' = (k + 2) / (n + 4), sqrt(p' (1 - p') / (n + 4))), so that
    0 of n or n of n is not reported as certain."""
    def count(column: str) -> pd.Series:
        return frame[column].map(lambda v: len(str(v).split("+")))

    contexts, depths, trials = NEEDLE_GRID
    n = count(contexts) * count(depths) * frame[trials]
    p = (frame["needle/mean"] * n + 2) / (n + 4)
    return np.sqrt(p * (1 - p) / (n + 4))


def before_and_after(frame: pd.DataFrame, cell: list[str], order: dict[str, list[str]], *,
                     built: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per ``cell``: the retrained record's val/ppl and needle beside the surgery-only
    record's (``surgery/...``), with the needle's standard error, and the ``built`` metrics (of the
    student's structure, such as decode speed: the retrained record's, else the surgery-only one's);
    each model's original first, then by cache share, key width and ``order`` (values per key)."""
    structural = ["kv.ratio", "surgery/val/ppl", *built]  # either record of the cell gives them
    frame = frame.assign(**{"needle/stderr": needle_stderr(frame)})
    measured = ["val/ppl", "needle/mean", "needle/stderr"]
    surgery, retrained = frame[frame["recipe"] == SURGERY], frame[frame["recipe"] != SURGERY]
    table = retrained.reindex(columns=[*cell, *structural, "recipe", *measured, "config_hash"])
    only = surgery.reindex(columns=[*cell, *structural, *measured, "config_hash"]).drop(columns="surgery/val/ppl")
    only = only.rename(columns={"val/ppl": "surgery/val/ppl", "needle/mean": "surgery/needle/mean",
                                "needle/stderr": "surgery/needle/stderr", "config_hash": "surgery/config_hash"})
    table = table.merge(only, on=cell, how="outer", suffixes=("", "_surgery_only"))
    for column in structural:
        table[column] = table[column].fillna(table.pop(f"{column}_surgery_only"))
    originals = with_originals(frame)
    originals = originals[originals["recipe"] == ORIGINAL]
    grid = frame.groupby("model.name")[NEEDLE_GRID].first()  # the original ran each model's needle grid too
    originals = originals.drop(columns=NEEDLE_GRID, errors="ignore").merge(grid, on="model.name", how="left")
    originals = originals.assign(**{"needle/stderr": needle_stderr(originals)})
    originals = originals.reindex(columns=["model.name", "kv.k_dim", "kv.v_dim", "kv.ratio", "recipe", *measured])
    table = pd.concat([originals, table], ignore_index=True)
    ranks = {f"_{key}": table[key].map({v: i for i, v in enumerate(values)}) for key, values in order.items()}
    table = table.assign(_orig=table["recipe"] != ORIGINAL, **ranks).sort_values(
        ["model.name", "_orig", "kv.ratio", "kv.k_dim", *ranks],
        ascending=[True, True, False, False, *([True] * len(ranks))], kind="stable")
    columns = [*cell[:-1], "kv.ratio", "surgery/val/ppl", "surgery/needle/mean", "surgery/needle/stderr",
               "recipe", *measured, *built, "config_hash", "surgery/config_hash"]
    return table.reindex(columns=columns).reset_index(drop=True)


def _caption(what: str) -> str:
    return (f"{what} surgery/* is the student as built (no retraining), val/ppl and needle/mean the student "
            "retrained with recipe; the needle's stderr is Agresti-Coull over its retrievals. Each model's "
            "original first.")


def init_table(frame: pd.DataFrame) -> Table | None:
    """The init ablation: per model, dims, key arm and value init, the val perplexity and needle
    before and after retraining. None unless some record uses a data-aware init."""
    if "kv.qk_init" not in frame:
        return None
    rows = frame.dropna(subset=["kv.qk_init"])
    if "gqa.mode" in rows:
        rows = rows[rows["gqa.mode"].fillna("keep") == "keep"]
    if not (rows[["kv.qk_init", "kv.vo_init"]] != "strided").any(axis=None):
        return None
    return Table(name="init_ablation", frame=before_and_after(rows, INIT_CELL, INIT_ORDER),
                 caption=_caption("Initialisations of the reduced dims (head count kept):"),
                 sources=sources_of(rows))


def gqa_table(frame: pd.DataFrame) -> Table | None:
    """Head compression: per model, mode, KV heads and dims, the cache share, quality before and
    after retraining, the needle and decode speed; with the dims-only records of the same
    evaluation, so heads, dims and both compare at equal cache. None without a compressed record."""
    if "gqa.mode" not in frame or not (frame["gqa.mode"].fillna("keep") != "keep").any():
        return None
    converted = frame[frame["gqa.mode"] != "keep"]
    rows = frame[frame["eval.name"].isin(converted["eval.name"].unique())]
    return Table(name="gqa_conversion",
                 frame=before_and_after(rows, GQA_CELL, GQA_ORDER, built=("efficiency/ms_per_token_ratio",)),
                 caption=_caption("Head compression (gqa.kv_heads KV heads per layer), alone and with reduced "
                                  "dims, and the dims alone at the same evaluation; kv.ratio is the KV cache as a "
                                  "share of the original's, efficiency/ms_per_token_ratio decode time per token "
                                  "against it."),
                 sources=sources_of(rows))


def all_tables(frame: pd.DataFrame) -> list[Table]:
    """Every table the records allow (the RoPE table always: it needs none)."""
    tables = [rope_table()]
    if not frame.empty:
        tables += [main_table(frame), kv_table(frame), efficiency_table(frame), init_table(frame), gqa_table(frame)]
        tables += [ablation_table(frame, key) for key in ABLATIONS]
    return [t for t in tables if t is not None]
