"""One function per figure. Each returns a :class:`~analysis.output.Figure` (or None when no record
holds what it needs); heatmaps share :func:`heatmap`, and every figure's plotted numbers go to its
JSON sidecar. Figures plot cells (:func:`~analysis.frame.seed_cells`: the mean over seeds) but the
training curves, which are one run's each; labels name the RoPE each student ran (``rope_as_run``).
"""

from __future__ import annotations

import math
import re

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter  # noqa: E402

from analysis.frame import ORIGINAL, SEED, Runs, members, signature, with_originals  # noqa: E402
from analysis.output import Figure, sources_of  # noqa: E402
from analysis.tables import (  # noqa: E402
    SURGERY,
    ROPE_DIMS,
    ROPE_SCHEDULES,
    ROPE_THETA,
    headline_benchmark,
    rope_curves,
    with_average,
)

NEEDLE_CELL = re.compile(r"^needle/ctx(\d+)/depth(\d+)$")  # depth in percent of the haystack
# The per-stage loss columns of metrics.csv and their line styles.
STAGE_LOSSES = {"train/intra_loss": ":", "train/ntp_loss": "-", "train/kd_loss": "--", "train/pretrain_loss": "-."}
SCHEDULE_TITLES = {"standard": "standard RoPE", "freq_aware": "frequency-aware RoPE"}
# Quality metrics: axis label and whether higher is better.
QUALITY = {
    "val/ppl": ("val/ppl (retrained student, log scale)", False),
    "val/loss": ("val/loss (mean NLL, nats)", False),
    "benchmark_avg": ("benchmark_avg: mean accuracy (%)", True),
}


def label(row: pd.Series, *, seed: bool = False) -> str:
    """A short label: ``d_qk/d_vo rope_as_run recipe``, then the run's seed (``seed``) or a cell's
    seed count when over one."""
    if row["recipe"] == ORIGINAL:
        return f"{row['model.name']} original"
    text = f"{row['kv.k_dim']:.0f}/{row['kv.v_dim']:.0f} {row.get('rope_as_run', '')} {row['recipe']}"
    if seed:
        return f"{text} seed {row[SEED]}"
    return f"{text} n={row['n']:.0f}" if row.get("n", 1) > 1 else text


def heatmap(ax, matrix: pd.DataFrame, *, fmt: str, cmap: str, vmin=None, vmax=None):
    """Draw ``matrix`` (rows top to bottom) as an annotated heatmap; missing cells grey with a dash.
    Returns the image, for a colour bar."""
    values = matrix.to_numpy(dtype=float)
    colours = plt.get_cmap(cmap).with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns])
    ax.set_yticks(range(matrix.shape[0]), [str(r) for r in matrix.index])
    for (i, j), value in np.ndenumerate(values):
        if math.isnan(value):
            ax.text(j, i, "–", ha="center", va="center", fontsize=8)
            continue
        red, green, blue, _ = image.cmap(image.norm(value))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # perceived luminance of the cell
        ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    return image


def _main_variant(students: pd.DataFrame) -> pd.DataFrame:
    """The records of one model that form its d_qk x d_vo grid: among groups equal in every config
    key but the two dims, the one with the most records."""
    variant = signature(students, exclude=["kv.k_dim", "kv.v_dim"])
    return students[variant == variant.value_counts().index[0]]


def rope_title(grid: pd.DataFrame) -> str:
    """The RoPE a grid ran: one schedule, or which key dims ran which (the §2.2 confound, in view)."""
    ran = grid.groupby("rope_as_run")["kv.k_dim"].unique()
    if len(ran) == 1:
        return f"{ran.index[0]} RoPE"
    return "RoPE ran: " + ", ".join(f"{rope} (d_qk {', '.join(f'{d:.0f}' for d in sorted(dims, reverse=True))})"
                                    for rope, dims in ran.items())


def kv_heatmaps(runs: Runs) -> Figure | None:
    """d_qk x d_vo heatmaps per model (means over seeds): val perplexity and, when present, the
    headline benchmark."""
    frame = runs.cells
    if frame.empty:
        return None
    bench = headline_benchmark(frame)
    metrics = ["val/ppl"] + ([bench] if bench else [])
    models = sorted(frame["model.name"].unique())
    fig, axes = plt.subplots(len(metrics), len(models), figsize=(4.2 * len(models), 3.6 * len(metrics)), squeeze=False)
    data, used = {}, []
    for col, model in enumerate(models):
        grid = _main_variant(frame[frame["model.name"] == model])
        used.append(grid)
        first = grid.iloc[0]
        for row, metric in enumerate(metrics):
            matrix = grid.pivot_table(index="kv.k_dim", columns="kv.v_dim", values=metric, aggfunc="first", dropna=False)
            matrix = matrix.reindex(index=sorted(grid["kv.k_dim"].unique(), reverse=True),
                                    columns=sorted(grid["kv.v_dim"].unique(), reverse=True))
            percent = metric != "val/ppl"
            ax = axes[row, col]
            ax.set_title(f"{model}: {metric}, {first['recipe']}\n{rope_title(grid)}", fontsize=9)
            if matrix.isna().all().all():
                ax.text(0.5, 0.5, f"no record of {model}\nhas {metric}", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            image = heatmap(ax, matrix * 100 if percent else matrix, fmt=".1f" if percent else ".3g",
                            cmap="viridis" if percent else "viridis_r")
            fig.colorbar(image, ax=ax, label=f"{metric} (%)" if percent else metric)
            ax.set_xlabel("d_vo (kv.v_dim)")
            ax.set_ylabel("d_qk (kv.k_dim)")
            data.setdefault(model, {})[metric] = {
                "kv.k_dim": matrix.index.tolist(),
                "kv.v_dim": matrix.columns.tolist(),
                "values": matrix.to_numpy().tolist(),
            }
    fig.tight_layout()
    return Figure(
        name="kv_heatmap",
        figure=fig,
        caption="Retrained students over the d_qk x d_vo grid, means over seeds (brighter is better; grey: no record).",
        sources=sources_of(members(runs.frame, pd.concat(used)["config_hash"])),
        data=data,
    )


def rope_figure() -> Figure:
    """The RoPE-stability figure: a(m) against distance for each key dim, standard vs frequency-aware."""
    curves = rope_curves()
    fig, axes = plt.subplots(1, len(ROPE_SCHEDULES), figsize=(11, 4), sharey=True)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(ROPE_DIMS)))
    for ax, schedule in zip(axes, ROPE_SCHEDULES):
        for rank, (d, colour) in enumerate(zip(ROPE_DIMS, colours)):
            # Larger d on top: their smooth curves would vanish under the small-d oscillations.
            ax.plot(curves.index, curves[(schedule, d)], color=colour, lw=1.0, label=f"d = {d}", zorder=10 - rank)
        ax.axhline(0, color="0.4", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlim(1, curves.index.max())
        ax.set_title(SCHEDULE_TITLES[schedule])
        ax.set_xlabel("relative distance m (tokens, log scale)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("expected score of identical vectors a(m)")
    axes[-1].legend(title="key dim", loc="lower left", fontsize=8)
    fig.suptitle(f"RoPE stability at reduced key dims (θ = {ROPE_THETA:g})")
    fig.tight_layout()
    return Figure(
        name="rope_stability",
        figure=fig,
        caption="a(m) = (2/d) sum_j cos(m inv_freq_j) for two identical all-ones vectors at distance m.",
        sources=sources_of(pd.DataFrame()),
        data={f"{s}/d{d}": {"min": curves[(s, d)].min(), "share_negative": (curves[(s, d)] < 0).mean()}
              for s in ROPE_SCHEDULES for d in ROPE_DIMS},
    )


def _front(points: pd.DataFrame, metric: str, higher_better: bool) -> pd.DataFrame:
    """The Pareto front: points no smaller cache beats or matches on quality."""
    ordered = points.sort_values(["kv.ratio", metric], ascending=[True, not higher_better])
    best = ordered[metric].cummax() if higher_better else ordered[metric].cummin()
    improving = ordered[metric].eq(best) & ~best.duplicated()
    return ordered[improving]


def kv_axes(ax, ratios: pd.Series, *, y_label: str, log_y: bool) -> None:
    """KV-cache share on a log2 x axis ticked at the ``ratios`` present (in %), the quality label,
    a log y axis for perplexities, grid and legend."""
    ticks = sorted(ratios.dropna().unique() * 100)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:.3g}" for t in ticks], fontsize=8)
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("KV cache (% of the original, log scale)")
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def pareto_figure(runs: Runs) -> Figure | None:
    """Quality against KV-cache size (share of the original, log scale), with each model's front;
    a point is a cell's mean over seeds, the benchmark average without benchmarks at chance."""
    frame = runs.cells
    if frame.empty or "kv.ratio" not in frame:
        return None
    rows = with_average(with_originals(frame[frame["recipe"] != SURGERY]))
    metrics = [m for m in ("val/ppl", "benchmark_avg") if m in rows and rows[m].notna().any()]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    models = sorted(rows["model.name"].unique())
    colours = dict(zip(models, plt.get_cmap("tab10").colors))
    data = {}
    for ax, metric in zip(axes[0], metrics):
        y_label, higher_better = QUALITY[metric]
        scale = 100 if metric == "benchmark_avg" else 1
        for model in models:
            points = rows[(rows["model.name"] == model) & rows[metric].notna() & rows["kv.ratio"].notna()]
            if points.empty:
                continue
            students, original = points[points["recipe"] != ORIGINAL], points[points["recipe"] == ORIGINAL]
            front = _front(students, metric, higher_better)
            ax.scatter(students["kv.ratio"] * 100, students[metric] * scale, color=colours[model], s=18, alpha=0.6,
                       label=f"{model} students")
            ax.plot(front["kv.ratio"] * 100, front[metric] * scale, color=colours[model], lw=1.2, label=f"{model} front")
            ax.scatter(original["kv.ratio"] * 100, original[metric] * scale, color=colours[model], marker="*", s=140,
                       edgecolor="black", label=f"{model} original")
            for _, p in front.iterrows():
                ax.annotate(f"{p['kv.k_dim']:.0f}/{p['kv.v_dim']:.0f}", (p["kv.ratio"] * 100, p[metric] * scale),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
            data.setdefault(metric, {})[model] = [
                {"config_hash": p["config_hash"], "kv.ratio": p["kv.ratio"], metric: p[metric],
                 "on_front": p["config_hash"] in set(front["config_hash"])}
                for _, p in points.iterrows()
            ]
        kv_axes(ax, rows["kv.ratio"], y_label=y_label, log_y=metric == "val/ppl")
    fig.suptitle("Quality against KV-cache size (labels: d_qk/d_vo on the front)")
    fig.tight_layout()
    return Figure(
        name="pareto",
        figure=fig,
        caption="Each point a retrained student (mean over seeds), stars the original models; lines join each "
        "model's Pareto front (no smaller cache is as good).",
        sources=sources_of(members(runs.frame, frame.loc[frame["kv.ratio"].notna(), "config_hash"])),
        data=data,
    )


def training_curves(runs: Runs) -> Figure | None:
    """Training loss against tokens seen, one panel per model, one colour per run and one line
    style per stage (``train/<stage>_loss`` from metrics.csv: the stage losses differ in kind)."""
    frame = runs.frame
    if frame.empty:
        return None
    plotted = frame[frame["config_hash"].isin(runs.curves) & (frame["recipe"] != SURGERY)]  # surgery only: no loss
    if plotted.empty:
        return None
    models = sorted(plotted["model.name"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 4.5), squeeze=False)
    data = {}
    for ax, model in zip(axes[0], models):
        runs_of_model = plotted[plotted["model.name"] == model]
        seeds = SEED in runs_of_model and runs_of_model[SEED].nunique() > 1
        colours = plt.get_cmap("tab20").colors
        for colour, (_, row) in zip(colours * 10, runs_of_model.iterrows()):
            curve = runs.curves[row["config_hash"]]
            x_key = "train/tokens" if "train/tokens" in curve else "step"
            losses = [c for c in STAGE_LOSSES if c in curve] or ["train/loss"]
            data[row["config_hash"]] = {"x": x_key}
            for loss in losses:
                steps = curve.dropna(subset=[loss, x_key])
                ax.plot(steps[x_key] / (1e6 if x_key == "train/tokens" else 1), steps[loss], color=colour, lw=1,
                        ls=STAGE_LOSSES.get(loss, "-"))
                data[row["config_hash"]][loss] = {
                    "points": len(steps),
                    "last_x": steps[x_key].iloc[-1] if len(steps) else None,
                    "last": steps[loss].iloc[-1] if len(steps) else None,
                }
            ax.plot([], [], color=colour, label=label(row, seed=seeds))
        for loss, style in STAGE_LOSSES.items():
            if any(loss in runs.curves[h] for h in runs_of_model["config_hash"]):
                ax.plot([], [], color="0.3", ls=style, label=loss)
        ax.set_yscale("log")
        ax.set_xlabel("tokens seen (millions)" if x_key == "train/tokens" else "optimiser step")
        ax.set_ylabel("training loss (log scale)")
        ax.set_title(model)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="d_qk/d_vo rope recipe; stage",
                  title_fontsize=7)
    fig.tight_layout()
    return Figure(
        name="training_curves",
        figure=fig,
        caption="Training loss from each run's metrics.csv, one line style per stage: intra = intra-layer "
        "MSE (Stage I), ntp = cross-entropy, kd = distillation KL.",
        sources=sources_of(plotted),
        data=data,
    )


def needle_matrix(row: pd.Series) -> pd.DataFrame:
    """The needle success rates of one row as a depth (rows) x context length (columns) matrix."""
    cells = [(int(m[1]), int(m[2]) / 100, row[c]) for c in row.index if (m := NEEDLE_CELL.match(c)) and pd.notna(row[c])]
    long = pd.DataFrame(cells, columns=["context", "depth", "success"])
    return long.pivot_table(index="depth", columns="context", values="success", aggfunc="first").sort_index()


def needle_figure(runs: Runs) -> Figure | None:
    """Needle-in-a-haystack success (%) per depth x context length, one panel per cell (mean over
    seeds) and original."""
    frame = runs.cells
    if frame.empty or not any(NEEDLE_CELL.match(c) for c in frame.columns):
        return None
    rows = with_originals(frame)
    cells = [c for c in rows.columns if NEEDLE_CELL.match(c)]
    rows = rows[rows[cells].notna().any(axis=1)]
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.0 * nrows), squeeze=False)
    data = {}
    for ax, (_, row) in zip(axes.flat, rows.iterrows()):
        matrix = needle_matrix(row)
        image = heatmap(ax, matrix * 100, fmt=".0f", cmap="viridis", vmin=0, vmax=100)
        ax.set_title(label(row) if row["recipe"] == ORIGINAL else f"{row['model.name']}\n{label(row)}", fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth (share of haystack)", fontsize=8)
        key = row["name"] if row["recipe"] == ORIGINAL else row["config_hash"]
        data[key] = {"depth": matrix.index.tolist(), "context": matrix.columns.tolist(),
                     "values": matrix.to_numpy().tolist()}
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.colorbar(image, ax=axes, label="needle success (%)", shrink=0.8)
    return Figure(
        name="needle",
        figure=fig,
        caption="Needle-in-a-haystack success rate (%) by needle depth and context length, means over seeds.",
        sources=sources_of(members(runs.frame, rows["config_hash"])),
        data=data,
    )


FAMILIES = {"heads": ("o", "tab:blue"), "dims": ("s", "tab:orange"), "both": ("D", "tab:green")}


def family(row: pd.Series) -> str:
    """How a student's cache was cut: ``heads`` (fewer KV heads), ``dims`` (narrower heads) or ``both``."""
    heads = row.get("gqa.mode", "keep") not in ("keep", None) and not pd.isna(row.get("gqa.mode"))
    dims = (row["kv.k_dim"], row["kv.v_dim"]) != (row["model.head_dim"], row["model.head_dim"])
    return "both" if heads and dims else "heads" if heads else "dims"


def kv_bytes_quality(runs: Runs) -> Figure | None:
    """Retrained val perplexity (mean over seeds) against KV-cache size, heads and dims cut on one
    plot per model: the cells of the head-compression studies' evaluation (DESIGN.md §5)."""
    frame = runs.cells
    if "gqa.mode" not in frame or not (frame["gqa.mode"].fillna("keep") != "keep").any():
        return None
    converted = frame[frame["gqa.mode"] != "keep"]
    rows = frame[frame["eval.name"].isin(converted["eval.name"].unique()) & (frame["recipe"] != SURGERY)]
    rows = rows[rows["val/ppl"].notna()]
    if rows.empty:
        return None
    models = sorted(rows["model.name"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    originals = with_originals(rows)
    data = {}
    for ax, model in zip(axes[0], models):
        points = rows[rows["model.name"] == model].assign(family=lambda f: f.apply(family, axis=1))
        for name, (marker, colour) in FAMILIES.items():
            group = points[points["family"] == name]
            ax.scatter(group["kv.ratio"] * 100, group["val/ppl"], marker=marker, color=colour, s=30, label=name)
            for _, p in group.iterrows():
                heads = "" if pd.isna(p.get("gqa.kv_heads")) else f"{p['gqa.mode']}{'-qa' if p.get('gqa.query_aware') is True else ''} kv{p['gqa.kv_heads']:.0f} "
                ax.annotate(f"{heads}{p['kv.k_dim']:.0f}/{p['kv.v_dim']:.0f}", (p["kv.ratio"] * 100, p["val/ppl"]),
                            textcoords="offset points", xytext=(4, 3), fontsize=6)
        original = originals[(originals["model.name"] == model) & (originals["recipe"] == ORIGINAL)]
        ax.scatter(original["kv.ratio"] * 100, original["val/ppl"], marker="*", s=140, color="gold",
                   edgecolor="black", label="original")
        data[model] = points.reindex(columns=["config_hash", "family", "gqa.mode", "gqa.kv_heads", "kv.k_dim",
                                              "kv.v_dim", "kv.ratio", "val/ppl"]).to_dict("records")
        kv_axes(ax, points["kv.ratio"], y_label=QUALITY["val/ppl"][0], log_y=True)
        ax.set_title(model)
    fig.suptitle("Fewer KV heads, narrower heads, or both: quality at equal KV cache")
    fig.tight_layout()
    return Figure(
        name="kv_bytes_quality",
        figure=fig,
        caption="Each point a retrained student of the head-compression studies' evaluation: heads (gqa mode "
        "and KV heads at full dims), dims (d_qk/d_vo with every KV head) or both; the star is the original.",
        sources=sources_of(members(runs.frame, rows["config_hash"])),
        data=data,
    )


def all_figures(runs: Runs) -> list[Figure]:
    """Every figure the records allow (the RoPE figure always: it needs none)."""
    figures = [
        rope_figure(),
        kv_heatmaps(runs),
        pareto_figure(runs),
        training_curves(runs),
        needle_figure(runs),
        kv_bytes_quality(runs),
    ]
    return [f for f in figures if f is not None]
