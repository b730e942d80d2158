"""The W&B dashboards as code (analysis/dashboard.py): a study's report holds one block per table and
figure and its training curves grouped by config; its workspace groups runs by the study's varying
axes; ``make_tables.py --wandb --dry-run`` writes the specs without any network connection, and
publishing without network fails at once, naming ``wandb sync`` and ``--dry-run``."""

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import wandb_workspaces.reports.v2 as wr  # noqa: E402

from analysis import dashboard, make_tables  # noqa: E402
from analysis.figures import all_figures  # noqa: E402
from analysis.frame import load_records  # noqa: E402
from analysis.tables import all_tables  # noqa: E402

DESIGN_CARD = ROOT / "analysis" / "results" / "design_card" / "runs"
STUDIES = ROOT / "tests" / "fixtures" / "studies"


@pytest.fixture(scope="module")
def design_card():
    runs = load_records([DESIGN_CARD])
    (study, sub), = dashboard.split_studies(runs).items()
    tables, figures = all_tables(sub), all_figures(sub)
    report = dashboard.build_report("me", "kv-latent", study, sub, tables, figures, command="make_tables ...")
    return study, sub, tables, figures, report, dashboard.build_workspace("me", "kv-latent", study, sub)


def panels(report):
    return [(grid.runsets[0], panel) for grid in report.blocks if isinstance(grid, wr.PanelGrid) for panel in grid.panels]


def test_studies_are_named_by_their_own_eval_name_or_their_directory():
    assert list(dashboard.split_studies(load_records([DESIGN_CARD]))) == ["design_card"]  # eval=quick: a preset
    assert list(dashboard.split_studies(load_records([STUDIES]))) == ["gqa_conversion", "init_ablation"]


def test_the_report_holds_one_panel_per_table_and_figure(design_card):
    study, sub, tables, figures, report, _ = design_card
    shown = [p.table_name for _, p in panels(report) if isinstance(p, wr.WeavePanelSummaryTable)]
    shown += [key for _, p in panels(report) if isinstance(p, wr.MediaBrowser) for key in p.media_keys]
    assert shown == [f"tables/{t.name}" for t in tables] + [f"figures/{f.name}" for f in figures]
    assert {"tables/k_versus_v", "tables/efficiency", "figures/kv_heatmap", "figures/pareto",
            "figures/training_curves", "figures/needle"} <= set(shown)
    captions = [b.text for b in report.blocks if isinstance(b, wr.P)]
    assert captions[0].startswith("Sources: 4 run records at commit(s)") and "make_tables" in captions[0]
    assert sum(c.startswith("Sources:") for c in captions) == 1 + len(tables) + len(figures)  # one per artefact


def test_the_training_curves_are_grouped_by_config(design_card):
    *_, report, _ = design_card
    (runset, curve), = [(r, p) for r, p in panels(report) if isinstance(p, wr.LinePlot)]
    assert curve.y == ["train/loss"]
    assert runset.groupby == ["config.kv.k_dim.value", "config.kv.v_dim.value", "config.rope.schedule.value"]
    assert "config_hash" in runset.filters and all(h in runset.filters for h in ("2f92934f9a", "eb045df6d9"))


def test_the_workspace_groups_runs_by_the_study_axes(design_card):
    *_, workspace = design_card
    # the design card varies the dims; rope.schedule as run too (k_dim=64 runs standard RoPE)
    assert [g.name for g in workspace.runset_settings.groupby] == ["kv.k_dim", "kv.v_dim", "rope.schedule"]
    assert [s.name for s in workspace.sections] == ["training", "final metrics", "by kv.k_dim", "by kv.v_dim",
                                                    "by rope.schedule"]
    assert {p.groupby.name for p in workspace.sections[2].panels} == {"kv.k_dim"}


def test_dry_run_writes_the_specs_without_network(tmp_path, no_network, capsys):
    paths = make_tables.main([str(DESIGN_CARD), "--out", str(tmp_path), "--wandb", "me/kv-latent", "--dry-run"])
    assert no_network == []
    report = json.loads((tmp_path / "dashboards" / "design_card.report.json").read_text())
    workspace = json.loads((tmp_path / "dashboards" / "design_card.workspace.json").read_text())
    assert tmp_path / "dashboards" / "design_card.report.json" in paths
    assert report["entity"] == "me" and report["project"] == "kv-latent" and report["title"] == "kv-latent design_card"
    assert [g["name"] for g in workspace["runset_settings"]["groupby"]] == ["kv.k_dim", "kv.v_dim", "rope.schedule"]
    assert "would publish 'design_card' to me/kv-latent" in capsys.readouterr().out


def test_publishing_without_network_fails_fast_and_says_what_to_do(tmp_path, no_network):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        make_tables.main([str(DESIGN_CARD), "--out", str(tmp_path), "--wandb", "me/kv-latent"])
    assert time.perf_counter() - started < 10
    assert "wandb sync" in str(exit_.value) and "--dry-run" in str(exit_.value)
    assert not (tmp_path / "tables").exists()  # nothing built before the check


def test_wandb_needs_an_entity():
    with pytest.raises(SystemExit):
        make_tables.parse_args(["--wandb", "kv-latent", "--dry-run"])
