"""One function per table. Each takes the loaded :class:`~analysis.frame.Runs` and returns a
:class:`~analysis.output.Table` (or None when no record holds what it needs).

A row is a cell (:func:`~analysis.frame.seed_cells`): the records that differ only in ``train.seed``,
``n`` of them, each metric their mean with its companions (:mod:`analysis.stats`: std over seeds,
bootstrap interval over eval items, at chance). Rows are identified by ``model.name``, ``kv.k_dim``
(d_qk), ``kv.v_dim`` (d_vo), ``rope_as_run`` (the RoPE the student ran, not the ``rope.schedule``
asked for) and ``recipe`` (``train.stages``, or ``original`` for the original model), plus any other
config key that varies within a model (e.g. ``rope.at_full_dim``, ``train.lora_rank``). A table's
sources list every record behind its cells.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch

from analysis.frame import (ITEMS, ORIGINAL, Runs, config_columns, members, signature, with_companions,
                            with_originals)
from analysis.output import Table, sources_of
from analysis.stats import AT_CHANCE, N, difference_interval, difference_se, interval_verdict, seed_verdict
from kv_latent.rope import autocorrelation, inv_freq

KEYS = ["model.name", "kv.k_dim", "kv.v_dim", "rope_as_run", "recipe"]
# Config keys never shown beside KEYS: the seeds are merged (``n``), rope_as_run says what the asked
# schedule ran as, recipe names the stages.
HIDDEN = ("train.seed", "rope.schedule", "train.stages")
BENCHMARK = re.compile(r"^eval/[^/]+/acc$")
# The benchmark shown where there is room for only one (K-versus-V table, heatmap), best first.
HEADLINE_BENCHMARKS = ["eval/mmlu/acc", "eval/kvl_mmlu/acc", "eval/arc_easy/acc", "eval/kvl_cloze/acc"]
# RoPE stability (DESIGN.md §2.2): key dims, schedules, base and distances of the paper's figure.
ROPE_DIMS = (128, 64, 32, 16, 8)
ROPE_SCHEDULES = ("standard", "freq_aware")
ROPE_THETA = 1e4
ROPE_DISTANCES = torch.arange(1, 4097)
# K versus V (DESIGN.md §2.2, §2.5): the (d_qk, d_vo) cells as shares of head_dim -- both full, cut K,
# cut V (the equal-cache pair), both halved, both quartered -- and the RoPE protocols, in table order.
KV_CELLS = [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5), (0.25, 0.25)]
CUT_K, CUT_V = KV_CELLS[1], KV_CELLS[2]
ROPE_PROTOCOLS = ["standard", "freq_aware@every_dim", "freq_aware@reduced"]
PROTOCOLS = ["standard", "freq_aware@every_dim", "freq_matched", "qk_energy", "freq_aware@reduced"]
PROTOCOL_KEYS = ("rope.schedule", "rope.at_full_dim", "kv.qk_init", "kv.init")  # kv.init: older records' key init
KV_METRICS = ["kv.ratio", "val/loss", "val/ppl", "surgery/val/ppl", "needle/mean"]
# The ablations: the config key that differs, and the table it makes.
ABLATIONS = {"rope.schedule": "ablation_rope", "train.stages": "ablation_stages", "train.lora_rank": "ablation_lora"}


def benchmark_columns(frame: pd.DataFrame) -> list[str]:
    """The benchmark accuracy columns (``eval/<task>/acc``) present, in task order."""
    return sorted(c for c in frame.columns if BENCHMARK.match(c))


def scored_at_chance(frame: pd.DataFrame, benchmark: str) -> pd.Series:
    """Per row, whether ``benchmark``'s bootstrap interval contains its task's chance rate."""
    flag = frame.get(benchmark + AT_CHANCE)
    return pd.Series(False, index=frame.index) if flag is None else flag.eq(True)


def at_chance_benchmarks(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Per model, the benchmarks that some row of the model scores at chance: they are marked in
    their cells and left out of the model's average (a score at chance measures no task, and every
    row of a model must average the same tasks to compare)."""
    found = {}
    for model, rows in frame.groupby("model.name"):
        chance = [b for b in benchmark_columns(rows) if scored_at_chance(rows, b).any()]
        if chance:
            found[model] = chance
    return found


def headline_benchmark(frame: pd.DataFrame) -> str | None:
    """The one benchmark column to show where there is room for one (at chance in no row), or None."""
    present = [c for c in benchmark_columns(frame) if frame[c].notna().any() and not scored_at_chance(frame, c).any()]
    preferred = [c for c in HEADLINE_BENCHMARKS if c in present]
    return (preferred or present or [None])[0]


def with_average(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` plus ``benchmark_avg``: per model, the mean of the benchmark accuracies but those
    the model scores at chance somewhere (:func:`at_chance_benchmarks`), missing unless a row has
    every one of them (an average over fewer tasks would not compare)."""
    frame = frame.copy()
    excluded, bench = at_chance_benchmarks(frame), benchmark_columns(frame)
    average = pd.Series(np.nan, index=frame.index)
    for model, rows in frame.groupby("model.name"):
        used = [b for b in bench if b not in excluded.get(model, [])]
        if used:
            average[rows.index] = rows[used].mean(axis=1, skipna=False)
    frame["benchmark_avg"] = average
    return frame


def average_notes(frame: pd.DataFrame) -> list[str]:
    """The footnote naming the benchmarks :func:`with_average` left out, if any."""
    excluded = at_chance_benchmarks(frame)
    if not excluded:
        return []
    listed = "; ".join(f"{model}: {', '.join(bench)}" for model, bench in excluded.items())
    return ["At chance: a benchmark whose 95% bootstrap interval over items contains its chance rate is marked "
            "'at chance' and not ranked; benchmark_avg leaves out, per model, each benchmark some of its rows "
            f"score at chance ({listed})."]


def varying_keys(frame: pd.DataFrame, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """Config keys beyond :data:`KEYS` (and ``exclude``) whose value differs between two rows of one model."""
    students = frame[frame["recipe"] != ORIGINAL]
    candidates = [c for c in config_columns(students) if c not in {*KEYS, *HIDDEN, *exclude}]
    return [c for c in candidates if (students.groupby("model.name")[c].nunique(dropna=False) > 1).any()]


def _columns(frame: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The identifying keys, the keys that vary, the seed count, the given metrics with their
    companions and the config hash(es); a metric no record has is kept as an all-missing column so
    the table keeps its shape."""
    return frame.reindex(columns=[*KEYS, *varying_keys(frame), N, *with_companions(frame, metrics), "config_hash"])


def main_table(runs: Runs) -> Table:
    """The paper's main table: per model x (d_qk, d_vo) x recipe, benchmarks and their average,
    needle success, KV bytes and share of the original, TTFT change."""
    rows = with_average(with_originals(runs.cells))
    bench = benchmark_columns(rows)
    metrics = ["val/ppl", *bench, "benchmark_avg", "needle/mean", "kv.bytes_per_token", "kv.ratio", "efficiency/ttft_ratio"]
    return Table(
        name="main",
        frame=_columns(rows, metrics),
        caption="Main results per model, (d_qk, d_vo) and recipe (the original model first), mean ± std over "
        "n seeds with the 95% bootstrap interval over eval items in brackets. benchmark_avg is the mean of the "
        "benchmark accuracies, missing unless all are present; kv.ratio is the KV cache as a share of the "
        "original's; efficiency/ttft_ratio is time to first token relative to the original.",
        sources=sources_of(runs.frame),
        notes=average_notes(rows),
    )


def protocol(row: pd.Series) -> str | None:
    """A record's RoPE protocol, from its config: the key init where it is not strided
    (``freq_matched``, ``qk_energy``), else ``standard``, ``freq_aware@every_dim`` (freq_aware with
    ``rope.at_full_dim``, as the official code) or ``freq_aware@reduced`` (freq_aware at reduced key
    dims only: the confounded design of DESIGN.md §2.2)."""
    init = next((row[k] for k in ("kv.qk_init", "kv.init") if k in row and pd.notna(row[k])), "strided")
    if init != "strided":
        return init
    if row.get("rope.schedule") != "freq_aware":
        return row.get("rope.schedule")
    at_full_dim = row.get("rope.at_full_dim")
    return "freq_aware@every_dim" if pd.notna(at_full_dim) and bool(at_full_dim) else "freq_aware@reduced"


def kv_grid(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells with every KV head, each with its ``protocol``. A key-init protocol also gets the
    standard protocol's full-K cells (d_qk = head_dim: no key dim is cut, so the key init does not
    apply and the jobs are the standard ones), marked ``_borrowed``."""
    if "gqa.mode" in cells:
        cells = cells[cells["gqa.mode"].fillna("keep") == "keep"]
    cells = cells.assign(protocol=[protocol(row) for _, row in cells.iterrows()], _borrowed=False)
    full_k = cells[(cells["protocol"] == "standard") & (cells["kv.k_dim"] == cells["model.head_dim"])]
    inits = cells.loc[~cells["protocol"].isin(ROPE_PROTOCOLS), ["model.name", "protocol"]].drop_duplicates()
    borrowed = full_k.drop(columns="protocol").merge(inits, on="model.name").assign(_borrowed=True)
    return pd.concat([cells, borrowed], ignore_index=True)


def kv_rows(cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The K-versus-V rows: the :data:`KV_CELLS` (``_k``, ``_v``: shares of head_dim) of every model,
    protocol, recipe and variant (the other config keys that differ within a model, returned as the
    second value) that has a record of its own, sorted by model, :data:`PROTOCOLS`, variant and cell."""
    grid = kv_grid(cells)
    grid = grid.assign(_k=grid["kv.k_dim"] / grid["model.head_dim"], _v=grid["kv.v_dim"] / grid["model.head_dim"])
    grid = grid.merge(pd.DataFrame(KV_CELLS, columns=["_k", "_v"]).reset_index(names="_cell"), on=["_k", "_v"])
    shown = varying_keys(grid, exclude=(*PROTOCOL_KEYS, "kv.k_dim", "kv.v_dim"))
    variant = ["model.name", "protocol", "recipe", *shown]
    grid = grid.assign(_variant=grid.groupby(variant, sort=False, dropna=False).ngroup(),
                       _rank=grid["protocol"].map({p: i for i, p in enumerate(PROTOCOLS)}))
    grid = grid[~grid.groupby("_variant")["_borrowed"].transform("all")]  # borrowed arms alone compare nothing
    return grid.sort_values(["model.name", "_rank", "_variant", "_cell"], kind="stable"), shown


def kv_table(runs: Runs) -> Table | None:
    """K versus V: per model and RoPE protocol, the cells (D, D), (D/2, D), (D, D/2), (D/2, D/2),
    (D/4, D/4) of head_dim D with the RoPE each ran, val perplexity (mean ± std over seeds), the
    needle (with its bootstrap interval) and the cache share; each model's original first."""
    rows, shown = kv_rows(runs.cells)
    if rows.empty:
        return None
    table = with_originals(rows).reindex(columns=["model.name", "protocol", "recipe", *shown, "kv.k_dim", "kv.v_dim",
                                                  "rope_as_run", N, *with_companions(rows, KV_METRICS), "config_hash"])
    return Table(
        name="k_versus_v",
        frame=table,
        caption="K versus V per model and RoPE protocol: standard (rope.schedule=standard), freq_aware@every_dim "
        "(freq_aware with rope.at_full_dim=true), freq_matched and qk_energy (that key init at reduced d_qk; their "
        "full-K arms are the standard protocol's jobs), freq_aware@reduced (freq_aware with at_full_dim=false: "
        "a full-dim key keeps standard RoPE, so the arms differ in RoPE as well as dims). rope_as_run is the RoPE "
        "each student ran. Metrics are mean ± std over n seeds, the needle with its 95% bootstrap interval over "
        "trials; val/loss is the mean NLL (the paper's LogPPL), surgery/val/ppl the student before retraining.",
        sources=sources_of(members(runs.frame, rows["config_hash"])),
    )


def kv_summary_table(runs: Runs) -> Table | None:
    """Cut K against cut V at equal cache, per model, protocol, recipe and variant: both arms' val
    perplexity and needle, the K - V differences with their noise (standard error over seeds for
    the perplexity, a paired bootstrap over needle trials) and whether they exceed it, and the RoPE
    each arm ran. None when no variant has both arms."""
    rows, shown = kv_rows(runs.cells)
    variant = ["model.name", "protocol", "recipe", *shown]
    measured = ["rope_as_run", N, *with_companions(rows, ["val/ppl", "needle/mean"]), ITEMS, "config_hash"]

    def arm(cut: tuple[float, float], name: str) -> pd.DataFrame:
        part = rows[(rows["_k"] == cut[0]) & (rows["_v"] == cut[1])]
        return part.reindex(columns=[*variant, "kv.ratio", *measured]).rename(
            columns={c: f"{name}/{c}" for c in ["kv.ratio", *measured]})

    pairs = arm(CUT_K, "cut_k").merge(arm(CUT_V, "cut_v").drop(columns="cut_v/kv.ratio"), on=variant)
    pairs = pairs.dropna(subset=["cut_k/config_hash", "cut_v/config_hash"]).reset_index(drop=True)
    if pairs.empty:
        return None
    pairs = pairs.join(pd.DataFrame([k_minus_v(pair) for _, pair in pairs.iterrows()], index=pairs.index))
    arms = [f"{a}/{c}" for c in ("val/ppl", "needle/mean") for a in ("cut_k", "cut_v")]
    columns = [*variant, "cut_k/kv.ratio", "cut_k/rope_as_run", "cut_v/rope_as_run", "cut_k/n", "cut_v/n",
               *with_companions(pairs, arms[:2]), *with_companions(pairs, ["diff/val/ppl"]), "verdict/val/ppl",
               *with_companions(pairs, arms[2:]), *with_companions(pairs, ["diff/needle/mean"]), "verdict/needle/mean",
               "cut_k/config_hash", "cut_v/config_hash"]
    return Table(
        name="k_versus_v_summary",
        frame=pairs.reindex(columns=columns),
        caption="Cut K (d_qk = D/2, d_vo = D) against cut V (D, D/2) at equal cache (cut_k/kv.ratio, the same for "
        "both), per model and RoPE protocol (see k_versus_v). diff/* is K minus V: for val/ppl with the standard "
        "error sqrt(s_K²/n_K + s_V²/n_V) over seeds (sample std, ddof=1), 'exceeds noise' when |diff| > 2 se; for "
        "the needle with the 95% interval of a bootstrap resampling the trials jointly for both arms, 'exceeds "
        "noise' when it excludes 0. Where cut_k/rope_as_run and cut_v/rope_as_run differ, the arms differ in RoPE "
        "as well as dims (DESIGN.md §2.2).",
        sources=sources_of(members(runs.frame, [*pairs["cut_k/config_hash"], *pairs["cut_v/config_hash"]])),
    )


def k_minus_v(pair: pd.Series) -> dict[str, float | str | None]:
    """The K - V differences of one pair of arms, their noise and the verdicts on them."""
    ppl = pair["cut_k/val/ppl"] - pair["cut_v/val/ppl"]
    se = difference_se(pair.get("cut_k/val/ppl_std", np.nan), pair["cut_k/n"],
                       pair.get("cut_v/val/ppl_std", np.nan), pair["cut_v/n"])
    needle = pair["cut_k/needle/mean"] - pair["cut_v/needle/mean"]
    trials = [items.get("needle/mean") if isinstance(items, dict) else None
              for items in (pair.get(f"cut_k/{ITEMS}"), pair.get(f"cut_v/{ITEMS}"))]
    low, high = difference_interval(*trials) if all(t is not None for t in trials) else (np.nan, np.nan)
    return {"diff/val/ppl": ppl, "diff/val/ppl_se": se, "verdict/val/ppl": seed_verdict(ppl, se),
            "diff/needle/mean": needle, "diff/needle/mean_ci_lo": low, "diff/needle/mean_ci_hi": high,
            "verdict/needle/mean": interval_verdict(needle, low, high)}


def efficiency_table(runs: Runs) -> Table | None:
    """Measured efficiency over the grid: TTFT, ms per output token and their ratios to the original
    (with the spread of the ratio over measurement rounds where the record has it)."""
    cells = runs.cells
    measured = [c for c in cells.columns if c.startswith("efficiency/")]
    if not measured:
        return None
    rows = cells[cells[measured].notna().any(axis=1)]
    metrics = [
        "kv.bytes_per_token",
        "kv.ratio",
        "efficiency/ttft_s",
        "efficiency/ms_per_token",
        "efficiency/ttft_ratio",
        "efficiency/ttft_ratio_p25",
        "efficiency/ttft_ratio_p75",
        "efficiency/ms_per_token_ratio",
        "efficiency/ms_per_token_ratio_p25",
        "efficiency/ms_per_token_ratio_p75",
        "efficiency/kv_bytes_ratio",
    ]
    return Table(
        name="efficiency",
        frame=_columns(rows, metrics).reset_index(drop=True),
        caption="Efficiency (batch 1): time to first token, ms per output token, and their ratios to the original "
        "model (the median of per-round paired ratios, p25 and p75 their spread over rounds, where the record "
        "has them), mean ± std over n seeds; efficiency/kv_bytes_ratio is the measured cache share, kv.ratio the "
        "analytic one.",
        sources=sources_of(members(runs.frame, rows["config_hash"])),
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


def ablation_table(runs: Runs, key: str) -> Table | None:
    """Cells that differ only in config ``key``, side by side; None when there are none."""
    cells = runs.cells
    if cells.empty or key not in cells:
        return None
    groups = [g for _, g in cells.groupby(signature(cells, exclude=[key]), sort=False) if g[key].nunique() > 1]
    if not groups:
        return None
    rows = with_average(pd.concat([g.assign(comparison=i) for i, g in enumerate(groups, 1)], ignore_index=True))
    shown = [] if key in KEYS or key == "train.stages" else [key]
    metrics = ["val/loss", "val/ppl", "surgery/val/ppl", *benchmark_columns(rows), "benchmark_avg", "needle/mean"]
    table = rows.reindex(columns=["comparison", *KEYS, *shown, N, *with_companions(rows, metrics), "config_hash"])
    return Table(
        name=ABLATIONS[key],
        frame=table,
        caption=f"Ablation of {key}: rows with the same comparison number differ in {key} only (rope_as_run: the "
        "RoPE each ran); mean ± std over n seeds, [95% bootstrap interval over eval items].",
        sources=sources_of(members(runs.frame, rows["config_hash"])),
        notes=average_notes(rows),
    )


SURGERY = "surgery"  # the recipe of records without retraining
NEEDLE_GRID = ["eval.needle.context_lengths", "eval.needle.depths", "eval.needle.trials"]
# The init ablation (DESIGN.md §2.6): dims, the key arm (init and RoPE), the value init.
INIT_CELL = ["model.name", "kv.k_dim", "kv.v_dim", "kv.qk_init", "rope_as_run", "kv.vo_init", "eval.name"]
INIT_ORDER = {"kv.qk_init": ["strided", "freq_matched", "qk_energy"], "rope_as_run": ["standard", "freq_aware"],
              "kv.vo_init": ["strided", "pca"]}
# Head compression (DESIGN.md §5): the mode, its KV heads and the dims it composes with.
GQA_CELL = ["model.name", "gqa.mode", "gqa.query_aware", "gqa.kv_heads", "kv.k_dim", "kv.v_dim", "kv.qk_init",
            "kv.vo_init", "eval.name"]
GQA_ORDER = {"gqa.mode": ["keep", "mean_pool", "svd_w", "svd_a", "rope_pca"]}


def needle_stderr(frame: pd.DataFrame) -> pd.Series:
    """Standard error of ``needle/mean`` over the n = contexts x depths x trials x seeds retrievals
    of the cell's needle grid (a row without ``n``, the original model's, ran the grid once),
    Agresti-Coull (p' = (k + 2) / (n + 4), sqrt(p' (1 - p') / (n + 4))), so that 0 of n or n of n is
    not reported as certain."""
    def count(column: str) -> pd.Series:
        return frame[column].map(lambda v: len(str(v).split("+")))

    contexts, depths, trials = NEEDLE_GRID
    seeds = frame[N].fillna(1) if N in frame else 1
    n = count(contexts) * count(depths) * frame[trials] * seeds
    p = (frame["needle/mean"] * n + 2) / (n + 4)
    return np.sqrt(p * (1 - p) / (n + 4))


def before_and_after(frame: pd.DataFrame, cell: list[str], order: dict[str, list[str]], *,
                     built: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per ``cell``: the retrained cell's val/ppl and needle beside the surgery-only cell's
    (``surgery/...``), each with its seeds and uncertainty (std, bootstrap interval, the needle's
    standard error), and the ``built`` metrics (of the student's structure, such as decode speed:
    the retrained cell's, else the surgery-only one's); each model's original first, then by cache
    share, key width and ``order`` (values per key)."""
    frame = frame.assign(**{"needle/stderr": needle_stderr(frame)})
    structural = with_companions(frame, ["kv.ratio", "surgery/val/ppl", *built])  # either cell gives them
    measured = [*with_companions(frame, ["val/ppl", "needle/mean"]), "needle/stderr", N]
    surgery, retrained = frame[frame["recipe"] == SURGERY], frame[frame["recipe"] != SURGERY]
    table = retrained.reindex(columns=[*cell, *structural, "recipe", *measured, "config_hash"])
    before = [c for c in structural if c.startswith(f"{SURGERY}/")]  # a surgery-only cell's own val/ppl is "before"
    only = surgery.reindex(columns=[*cell, *structural, *measured, "config_hash"]).drop(columns=before)
    only = only.rename(columns={c: f"{SURGERY}/{c}" for c in [*measured, "config_hash"]})
    table = table.merge(only, on=cell, how="outer", suffixes=("", "_surgery_only"))
    for column in structural:
        if f"{column}_surgery_only" in table:
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
    columns = [*cell[:-1], "kv.ratio", f"{SURGERY}/{N}",
               *with_companions(table, ["surgery/val/ppl", "surgery/needle/mean"]), "surgery/needle/stderr", "recipe", N, *with_companions(table, ["val/ppl", "needle/mean"]),
               "needle/stderr", *with_companions(table, built), "config_hash", "surgery/config_hash"]
    return table.reindex(columns=columns).reset_index(drop=True)


def _caption(what: str) -> str:
    return (f"{what} surgery/* is the student as built (no retraining), val/ppl and needle/mean the student "
            "retrained with recipe, each mean ± std over n seeds, the needle with its 95% bootstrap interval over "
            "trials where recorded; the needle's stderr is Agresti-Coull over its retrievals (of all seeds). "
            "rope_as_run is the RoPE each student ran. Each model's original first.")


def init_table(runs: Runs) -> Table | None:
    """The init ablation: per model, dims, key arm and value init, the val perplexity and needle
    before and after retraining. None unless some record uses a data-aware init."""
    cells = runs.cells
    if "kv.qk_init" not in cells:
        return None
    rows = cells.dropna(subset=["kv.qk_init"])
    if "gqa.mode" in rows:
        rows = rows[rows["gqa.mode"].fillna("keep") == "keep"]
    if not (rows[["kv.qk_init", "kv.vo_init"]] != "strided").any(axis=None):
        return None
    return Table(name="init_ablation", frame=before_and_after(rows, INIT_CELL, INIT_ORDER),
                 caption=_caption("Initialisations of the reduced dims (head count kept):"),
                 sources=sources_of(members(runs.frame, rows["config_hash"])))


def gqa_table(runs: Runs) -> Table | None:
    """Head compression: per model, mode, KV heads and dims, the cache share, quality before and
    after retraining, the needle and decode speed; with the dims-only records of the same
    evaluation, so heads, dims and both compare at equal cache. None without a compressed record."""
    cells = runs.cells
    if "gqa.mode" not in cells or not (cells["gqa.mode"].fillna("keep") != "keep").any():
        return None
    converted = cells[cells["gqa.mode"] != "keep"]
    rows = cells[cells["eval.name"].isin(converted["eval.name"].unique())]
    return Table(name="gqa_conversion",
                 frame=before_and_after(rows, GQA_CELL, GQA_ORDER, built=("efficiency/ms_per_token_ratio",)),
                 caption=_caption("Head compression (gqa.kv_heads KV heads per layer), alone and with reduced "
                                  "dims, and the dims alone at the same evaluation; kv.ratio is the KV cache as a "
                                  "share of the original's, efficiency/ms_per_token_ratio decode time per token "
                                  "against it."),
                 sources=sources_of(members(runs.frame, rows["config_hash"])))


def all_tables(runs: Runs) -> list[Table]:
    """Every table the records allow (the RoPE table always: it needs none)."""
    tables = [rope_table()]
    if not runs.frame.empty:
        tables += [main_table(runs), kv_table(runs), kv_summary_table(runs), efficiency_table(runs), init_table(runs),
                   gqa_table(runs)]
        tables += [ablation_table(runs, key) for key in ABLATIONS]
    return [t for t in tables if t is not None]
