"""W&B dashboards as code: per study, a Report (every table and figure of the study, each with its
provenance line, and the training curves live from the job runs) and a Workspace (panels that group
the study's runs by its varying axes), built with ``wandb-workspaces`` from the records.

A study is named by its records' ``eval.name`` where a study set its own (``gqa_conversion``,
``init_ablation``); where the name is an evaluation preset of ``conf/eval`` (``quick``, ``full``,
``paper``) it is the directory holding the records' ``runs/`` folder (``analysis/results/design_card``
-> ``design_card``, a sweep's ``output_root``). The dashboards select a study's job runs by their
``config_hash`` field (:func:`kv_latent.tracking.run_fields`) and its tables and figures by the
analysis run that ``make_tables.py --wandb`` logs them to (config ``analysis.study``).

Building a spec needs no network (a Report's or Runset's ``_to_model`` would: it looks the project
up); :func:`spec` serialises the library's own pydantic dataclasses for ``--dry-run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pydantic
import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces import expr

from analysis.frame import Runs
from analysis.output import Figure, Table, footnote

EVAL_PRESETS = frozenset(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "eval").glob("*.yaml"))
# Record-frame column -> the run's flat W&B config field (kv_latent.tracking.run_fields).
AXES = {"model.name": "model.name", "kv.k_dim": "kv.k_dim", "kv.v_dim": "kv.v_dim", "rope_as_run": "rope.schedule",
        "rope.at_full_dim": "rope.at_full_dim", "kv.qk_init": "kv.qk_init", "kv.vo_init": "kv.vo_init",
        "gqa.mode": "gqa.mode", "gqa.kv_heads": "gqa.kv_heads", "recipe": "train.recipe", "train.seed": "train.seed"}
CURVE_GROUPS = ["kv.k_dim", "kv.v_dim", "rope.schedule"]  # the training curves' lines, as the figure draws them
SEED_FIELD = "train.seed"  # seeds are not a grouping axis: each group's band spans them
FINAL_METRICS = ["val/ppl", "needle/mean", "efficiency/kv_bytes_ratio", "efficiency/ttft_ratio",
                 "efficiency/ms_per_token_ratio", "efficiency/peak_memory_ratio"]
STUDY_CONFIG = "analysis.study"  # the config field of the analysis run holding a study's tables and figures


@dataclass
class Dashboard:
    """One study's report and workspace, and the tables and figures they show."""

    study: str
    report: wr.Report
    workspace: ws.Workspace


def study_name(row: pd.Series) -> str:
    """The study of one record row (the module docstring's rule)."""
    name = row.get("eval.name")
    if isinstance(name, str) and name not in EVAL_PRESETS:
        return name
    parts = Path(str(row.get("source") or "")).parts
    if "runs" in parts[1:]:
        return parts[len(parts) - 1 - parts[::-1].index("runs") - 1]
    return str(name)


def split_studies(runs: Runs) -> dict[str, Runs]:
    """The loaded runs per study, each with the training curves of its records."""
    if runs.frame.empty:
        return {}
    names = runs.frame.apply(study_name, axis=1)
    studies = {}
    for study, frame in runs.frame.groupby(names, sort=True):
        frame = frame.reset_index(drop=True)
        studies[study] = Runs(frame, {h: c for h, c in runs.curves.items() if h in set(frame["config_hash"])})
    return studies


def varying_axes(frame: pd.DataFrame) -> list[str]:
    """The run fields (:data:`AXES`) whose value differs between the study's records, seed excepted."""
    return [field for column, field in AXES.items()
            if field != SEED_FIELD and column in frame and frame[column].nunique(dropna=False) > 1]


def provenance(frame: pd.DataFrame) -> str:
    """The study's provenance line: its records and commits (as every artefact's footnote)."""
    return footnote(frame, "<table>").replace("; config hashes in <table>.sources.csv.", ".")


def job_runset(entity: str, project: str, frame: pd.DataFrame, *, groupby: list[str] = ()) -> wr.Runset:
    """The study's job runs (by config hash), grouped by the given flat config fields."""
    return wr.Runset(entity=entity, project=project, name="jobs",
                     filters=expr.And(expr.Config("config_hash").isin(sorted(frame["config_hash"]))),
                     groupby=[f"config.{field}.value" for field in groupby])  # flat key: `.value` last


def analysis_runset(entity: str, project: str, study: str) -> wr.Runset:
    """The analysis run that ``make_tables.py --wandb`` logs the study's tables and figures to."""
    return wr.Runset(entity=entity, project=project, name="tables and figures",
                     filters=expr.And(expr.Config(STUDY_CONFIG) == study))


def artefact_blocks(artefact: Table | Figure, runset: wr.Runset) -> list[Any]:
    """A table's or figure's heading, caption, provenance line and its panel (the logged W&B table
    or image)."""
    panel = (wr.WeavePanelSummaryTable(table_name=f"tables/{artefact.name}", layout=wr.Layout(w=24, h=12))
             if isinstance(artefact, Table) else
             wr.MediaBrowser(title=artefact.name, media_keys=[f"figures/{artefact.name}"], layout=wr.Layout(w=24, h=12)))
    return [wr.H2(text=artefact.name), wr.P(text=artefact.caption), wr.P(text=footnote(artefact.sources, artefact.name)),
            wr.PanelGrid(runsets=[runset], panels=[panel])]


def curve_blocks(entity: str, project: str, frame: pd.DataFrame) -> list[Any]:
    """The training loss of the study's job runs, one line (band over seeds) per config."""
    plot = wr.LinePlot(title="train/loss by config", x="Step", y=["train/loss"], layout=wr.Layout(w=24, h=10))
    return [wr.P(text=f"Live from the job runs, grouped by {', '.join(CURVE_GROUPS)}."),
            wr.PanelGrid(runsets=[job_runset(entity, project, frame, groupby=CURVE_GROUPS)], panels=[plot])]


def build_report(entity: str, project: str, study: str, runs: Runs, tables: list[Table], figures: list[Figure],
                 *, command: str) -> wr.Report:
    """The study's report: title, provenance and regenerate command, then every table and figure."""
    analysis = analysis_runset(entity, project, study)
    blocks: list[Any] = [wr.H1(text=f"kv-latent: {study}"),
                         wr.P(text=f"{provenance(runs.frame)} Regenerate: {command}")]
    for artefact in [*tables, *figures]:
        blocks += artefact_blocks(artefact, analysis)
        if artefact.name == "training_curves":
            blocks += curve_blocks(entity, project, runs.frame)
    return wr.Report(entity=entity, project=project, title=f"kv-latent {study}",
                     description=f"The {study} study's tables and figures, built by analysis/dashboard.py.",
                     blocks=blocks, width="fluid")


def metrics_of(frame: pd.DataFrame) -> list[str]:
    """The final metrics (:data:`FINAL_METRICS`) some record of the study has."""
    return [m for m in FINAL_METRICS if m in frame and frame[m].notna().any()]


def build_workspace(entity: str, project: str, study: str, runs: Runs) -> ws.Workspace:
    """The study's workspace: its job runs grouped by its varying axes; a training section, a final
    metrics section (with the KV-ratio Pareto scatter) and one section per varying axis."""
    axes, metrics = varying_axes(runs.frame), metrics_of(runs.frame)
    sections = [
        ws.Section(name="training", is_open=True,
                   panels=[wr.LinePlot(title=y, y=[y]) for y in ("train/loss", "train/lr")]),
        ws.Section(name="final metrics", is_open=True,
                   panels=[wr.BarPlot(title=m, metrics=[m]) for m in metrics]
                   + [wr.ScatterPlot(title="pareto: val/ppl vs kv ratio", x=wr.SummaryMetric("efficiency/kv_bytes_ratio"),
                                     y=wr.SummaryMetric("val/ppl"))]),
    ]
    sections += [ws.Section(name=f"by {axis}",
                            panels=[wr.BarPlot(title=f"{m} by {axis}", metrics=[m], groupby=wr.Config(axis)) for m in metrics])
                 for axis in axes]
    settings = ws.RunsetSettings(filters=expr.And(expr.Config("config_hash").isin(sorted(runs.frame["config_hash"]))),
                                 groupby=[expr.Config(axis) for axis in axes])
    return ws.Workspace(entity=entity, project=project, name=f"kv-latent {study}", sections=sections,
                        runset_settings=settings)


def spec(obj: wr.Report | ws.Workspace) -> dict[str, Any]:
    """A report's or workspace's spec as JSON-able data: the library's pydantic fields, no network."""
    return pydantic.TypeAdapter(type(obj)).dump_python(obj, mode="json", exclude_none=True)


def panel_list(dashboard: Dashboard) -> list[str]:
    """What a dashboard holds, one line per report section or workspace section (for review)."""
    lines, heading = [], None
    for block in dashboard.report.blocks:
        if isinstance(block, (wr.H1, wr.H2)):
            heading = block.text
        elif isinstance(block, wr.PanelGrid):
            for panel in block.panels:
                shown = getattr(panel, "table_name", None) or getattr(panel, "media_keys", None) or getattr(panel, "y", None)
                group = block.runsets[0].groupby
                lines.append(f"report  | {heading}: {type(panel).__name__} {shown}" + (f" grouped by {group}" if group else ""))
    groupby = [g.name for g in dashboard.workspace.runset_settings.groupby]
    for section in dashboard.workspace.sections:
        titles = ", ".join(p.title or "" for p in section.panels)
        lines.append(f"workspace | {section.name} (runs grouped by {groupby}): {titles}")
    return lines


def regenerate_command(roots: list[Path], out: Path, target: str) -> str:
    """The command that rebuilds and republishes the study's dashboards."""
    return f"python analysis/make_tables.py {' '.join(map(str, roots))} --out {out} --wandb {target}"
