"""analysis/make_tables.py on committed fixture records, and the experiments/ study configs.

The fixtures (tests/fixtures/records/) are nine records of the two tiny models with realistic keys
and some cells deliberately missing (a benchmark, needle, efficiency, surgery metrics), one
metrics.csv, and one pair of records differing in each ablated key.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `analysis` is a top-level folder, not an installed package

from analysis import make_tables  # noqa: E402
from analysis.frame import flatten, load_records, load_wandb  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "records"
RECORDS = {
    json.loads(p.read_text())["config_hash"]: json.loads(p.read_text()) for p in FIXTURES.rglob("record.json")
}
TABLES = ["main", "k_versus_v", "efficiency", "rope_stability", "ablation_rope", "ablation_stages", "ablation_lora"]
FIGURES = ["rope_stability", "kv_heatmap", "pareto", "training_curves", "needle"]
# Fixture hashes: the tiny_mha 32/32 reference run and the runs that differ from it in one key.
REFERENCE, STANDARD_ROPE, NTP_ONLY, LORA_32 = "4ee6ea2a93", "b4d6f3a5e1", "054e625ea9", "a17c14741a"
NO_MMLU = "dfcb285b02"  # tiny_mha 32/64: eval/kvl_mmlu/* and needle/* missing


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis")
    make_tables.main([str(FIXTURES), "--out", str(out)])
    return out


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / "tables" / f"{name}.csv")


def record_value(record: dict, column: str):
    """The record's value for a table column, or KeyError if the column is not a record field."""
    for source in (record["metrics"], {f"kv.{k}": v for k, v in record["kv"].items()}, flatten(record["config"])):
        if column in source:
            return source[column]
    if column in record:
        return record[column]
    raise KeyError(column)


def test_every_artefact_is_written(out):
    for name in TABLES:
        for ext in ("md", "tex", "csv", "sources.csv"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    for name in FIGURES:
        for ext in ("png", "pdf", "json"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"


@pytest.mark.parametrize("name", [t for t in TABLES if t != "rope_stability"])
def test_table_cells_equal_the_records(out, name):
    table = read(out, name)
    students = table[table["config_hash"].notna()]
    assert len(students) >= 2
    checked = 0
    for _, row in students.iterrows():
        record = RECORDS[row["config_hash"]]
        for column, cell in row.items():
            try:
                expected = record_value(record, column)
            except KeyError:
                if column.startswith(("eval/", "needle/", "efficiency/", "val/", "surgery/", "kv.")):
                    assert pd.isna(cell), f"{name}: {column} of {row['config_hash']} is not in the record"
                continue
            if isinstance(expected, list):
                expected = "+".join(expected)
            if expected is None:
                assert pd.isna(cell), f"{name}: {column}"
            elif isinstance(expected, str):
                assert str(cell) == expected, f"{name}: {column}"
            else:
                assert cell == pytest.approx(expected, rel=1e-12), f"{name}: {column}"
            checked += 1
    assert checked > 10


def test_missing_cells_stay_missing(out):
    main = read(out, "main").set_index("config_hash", drop=False)
    row = main.loc[NO_MMLU]
    assert pd.isna(row["eval/kvl_mmlu/acc"]) and pd.isna(row["needle/mean"])
    assert pd.isna(row["benchmark_avg"]), "an average over fewer benchmarks must not be filled in"
    assert row["eval/kvl_cloze/acc"] == RECORDS[NO_MMLU]["metrics"]["eval/kvl_cloze/acc"]
    md = (out / "tables" / "main.md").read_text()
    line = next(line for line in md.splitlines() if NO_MMLU in line)
    assert line.count("| –") >= 3  # mmlu, average, needle
    assert "nan" not in md.lower() and "nan" not in (out / "tables" / "main.tex").read_text().lower()


def test_benchmark_average_and_original_rows(out):
    main = read(out, "main")
    reference = main[main["config_hash"] == REFERENCE].iloc[0]
    metrics = RECORDS[REFERENCE]["metrics"]
    assert reference["benchmark_avg"] == pytest.approx((metrics["eval/kvl_cloze/acc"] + metrics["eval/kvl_mmlu/acc"]) / 2)
    original = main[(main["model.name"] == "tiny_mha") & (main["recipe"] == "original")].iloc[0]
    assert original["val/ppl"] == metrics["original/val/ppl"]
    assert original["eval/kvl_mmlu/acc"] == metrics["original/eval/kvl_mmlu/acc"]
    assert original["needle/mean"] == metrics["original/needle/mean"]
    assert original["kv.bytes_per_token"] == RECORDS[REFERENCE]["kv"]["original_bytes_per_token"]
    assert (original["kv.k_dim"], original["kv.v_dim"]) == (64, 64)
    gqa_original = main[(main["model.name"] == "tiny_gqa") & (main["recipe"] == "original")].iloc[0]
    assert pd.isna(gqa_original["eval/kvl_mmlu/acc"])  # the gqa records have no benchmark results


@pytest.mark.parametrize(
    "name, pair", [("ablation_rope", {REFERENCE, STANDARD_ROPE}), ("ablation_stages", {REFERENCE, NTP_ONLY}),
                   ("ablation_lora", {REFERENCE, LORA_32})]
)
def test_ablations_pair_records_that_differ_in_one_key(out, name, pair):
    table = read(out, name)
    assert set(table["config_hash"]) == pair
    assert table["comparison"].nunique() == 1


def test_every_artefact_lists_its_records(out):
    sources = pd.read_csv(out / "tables" / "main.sources.csv")
    assert set(sources["config_hash"]) == set(RECORDS)
    for _, row in sources.iterrows():
        assert row["code.commit"] == RECORDS[row["config_hash"]]["code"]["commit"]
    efficiency = pd.read_csv(out / "tables" / "efficiency.sources.csv")
    assert set(efficiency["config_hash"]) == {h for h, r in RECORDS.items() if "efficiency/ttft_s" in r["metrics"]}
    assert "main.sources.csv" in (out / "tables" / "main.md").read_text()
    for name in FIGURES:
        sidecar = json.loads((out / "figures" / f"{name}.json").read_text())
        assert {s["config_hash"] for s in sidecar["sources"]} <= set(RECORDS)


def test_rope_table_reproduces_the_reference_values(out):
    rope = read(out, "rope_stability").set_index(["kv.k_dim", "rope.schedule"])
    reference = {  # DESIGN.md §2.2: minimum of a(m) and share of negative a(m), theta = 1e4, m = 1..4096
        (16, "standard"): (-0.656, 0.39),
        (16, "freq_aware"): (-0.396, 0.21),
        (8, "standard"): (-0.963, None),
        (8, "freq_aware"): (-0.611, None),
    }
    for key, (minimum, share) in reference.items():
        assert rope.loc[key, "autocorrelation_min"] == pytest.approx(minimum, abs=5e-4)
        if share is not None:
            assert rope.loc[key, "share_negative"] == pytest.approx(share, abs=5e-3)
    assert set(rope.index.get_level_values(0)) == {128, 64, 32, 16, 8}


def test_figure_data_equal_the_records(out):
    heat = json.loads((out / "figures" / "kv_heatmap.json").read_text())["data"]["tiny_mha"]["val/ppl"]
    by_dims = {(r["config"]["kv"]["k_dim"], r["config"]["kv"]["v_dim"]): r for h, r in RECORDS.items()
               if r["config"]["model"]["name"] == "tiny_mha" and r["config"]["train"]["lora_rank"] == 8
               and r["config"]["rope"]["schedule"] == "freq_aware" and r["config"]["train"]["stages"] == ["intra", "ntp"]}
    for i, k in enumerate(heat["kv.k_dim"]):
        for j, v in enumerate(heat["kv.v_dim"]):
            assert heat["values"][i][j] == by_dims[(k, v)]["metrics"]["val/ppl"]
    curve = pd.read_csv(next(FIXTURES.rglob("metrics.csv")))
    logged = json.loads((out / "figures" / "training_curves.json").read_text())["data"][REFERENCE]
    assert logged["train/ntp_loss"]["last"] == curve["train/ntp_loss"].dropna().iloc[-1]
    assert logged["train/intra_loss"]["points"] == curve["train/intra_loss"].notna().sum()
    needle = json.loads((out / "figures" / "needle.json").read_text())["data"]
    cells = needle[RECORDS[REFERENCE]["name"]]
    depth, context = cells["depth"].index(0.5), cells["context"].index(1024)
    assert cells["values"][depth][context] == RECORDS[REFERENCE]["metrics"]["needle/ctx1024/depth50"]
    assert RECORDS[NO_MMLU]["name"] not in needle  # no needle results: no panel


class FakeRun(SimpleNamespace):
    """A W&B public-API run built from a record, as the pipeline would have logged it."""

    def history(self, pandas=True):
        return self.curve


def fake_wandb_runs() -> list[FakeRun]:
    runs = []
    for i, record in enumerate(RECORDS.values()):
        summary = {**record["metrics"], **{f"kv/{k}": v for k, v in record["kv"].items()}, "_runtime": 1.0}
        csv = FIXTURES / "runs" / record["name"] / "metrics.csv"
        runs.append(FakeRun(id=f"run{i}", name=record["name"], state="finished", config=record["config"],
                            summary=summary, metadata={"git": {"commit": record["code"]["commit"]}},
                            created_at=record["created"], curve=pd.read_csv(csv) if csv.exists() else pd.DataFrame()))
    return runs


def test_wandb_runs_load_like_records():
    api = SimpleNamespace(runs=lambda path: fake_wandb_runs())
    from_wandb = load_wandb("me/kv-latent", api=api)
    from_records = load_records([FIXTURES])
    columns = ["config_hash", "code.commit", "model.name", "kv.k_dim", "kv.v_dim", "recipe", "val/ppl",
               "eval/kvl_mmlu/acc", "needle/mean", "kv.ratio", "kv.bytes_per_token"]
    pd.testing.assert_frame_equal(from_wandb.frame[columns], from_records.frame[columns])
    assert set(from_wandb.curves) == set(from_records.curves) == {REFERENCE}


def test_wandb_logging_runs_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import matplotlib.pyplot as plt

    from analysis.tables import rope_table

    (tmp_path / "figures").mkdir()
    plt.imsave(tmp_path / "figures" / "tiny.png", [[0.0, 1.0]])
    make_tables.log_to_wandb("me/kv-latent", [rope_table()], tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run was written"
    assert wandb.run is None  # finished


def test_a_corrupt_record_is_skipped_with_a_warning(tmp_path, caplog):
    shutil.copytree(FIXTURES, tmp_path / "records")
    broken = next((tmp_path / "records").rglob("record.json"))
    broken.write_text(broken.read_text()[:100])
    runs = load_records([tmp_path / "records"])
    assert len(runs.frame) == len(RECORDS) - 1
    assert f"skipping {broken} is not valid JSON" in caplog.text


def test_no_records_still_makes_the_math_artefacts(tmp_path):
    make_tables.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    made = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert made == sorted([f"rope_stability.{e}" for e in ("md", "tex", "csv", "sources.csv", "png", "pdf", "json")])


def test_help():
    with pytest.raises(SystemExit) as exit_:
        make_tables.parse_args(["--help"])
    assert exit_.value.code == 0


# ---------------------------------------------------------------------------------------------
# experiments/: every study composes, and every value of every swept key passes validation.

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))


def sweep_points(params: dict[str, str]) -> list[list[str]]:
    """Overrides covering every value of every swept key at least once (not the full product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in overrides]
    longest = max((len(a) for a in axes), default=0)
    return [[axis[i % len(axis)] for axis in axes] for i in range(longest)]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import compose_config
    from kv_latent.rules import check_ablation

    overrides = [f"+experiment={name}"]  # found through conf/experiment -> experiments/
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.params else {}
    assert params, f"experiments/{name}.yaml sweeps nothing (hydra.sweeper.params)"
    for point in sweep_points(params):
        typed, container = compose_config("config", overrides + point)
        if typed.trainer.wants_cuda:  # the GPU study: every rule but the device's
            typed.trainer.accelerator = "cpu"
        check_ablation(typed)  # every rule across groups (dims, RoPE schedule, windows, budget)
        assert container["kv"]["k_dim"] <= container["model"]["head_dim"], point


def test_experiment_points_cover_every_value():
    points = sweep_points({"model": "a,b", "kv.k_dim": "64,32,16"})
    assert points == [["model=a", "kv.k_dim=64"], ["model=b", "kv.k_dim=32"], ["model=a", "kv.k_dim=16"]]


# The study tables: a retrained record and a surgery-only record of one cell share a row.

STUDIES = ROOT / "tests" / "fixtures" / "studies"
STUDY_RECORDS = {json.loads(p.read_text())["config_hash"]: json.loads(p.read_text()) for p in STUDIES.rglob("record.json")}


@pytest.fixture(scope="module")
def study_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("studies")
    make_tables.main([str(STUDIES), "--out", str(out)])
    return out


def test_the_init_table_pairs_surgery_only_and_retrained_records(study_out):
    table = read(study_out, "init_ablation")
    by_key = {(r["kv.qk_init"], r["rope.schedule"], r["kv.vo_init"]): r for _, r in table.iterrows() if r["recipe"] != "original"}
    assert set(by_key) == {("strided", "standard", "strided"), ("strided", "standard", "pca"),
                           ("freq_matched", "freq_aware", "strided"), ("strided", "freq_aware", "strided")}
    for key in (("strided", "standard", "strided"), ("freq_matched", "freq_aware", "strided")):
        row = by_key[key]
        retrained, surgery = STUDY_RECORDS[row["config_hash"]], STUDY_RECORDS[row["surgery/config_hash"]]
        assert retrained["config"]["train"]["stages"] == ["intra", "ntp"] and surgery["config"]["train"]["stages"] == []
        assert row["val/ppl"] == retrained["metrics"]["val/ppl"] and row["needle/mean"] == retrained["metrics"]["needle/mean"]
        assert row["surgery/needle/mean"] == surgery["metrics"]["needle/mean"]
        assert row["surgery/val/ppl"] == pytest.approx(surgery["metrics"]["val/ppl"], rel=1e-9)
    only = by_key["strided", "freq_aware", "strided"]  # surgery only: no retrained numbers
    assert pd.isna(only["recipe"]) and pd.isna(only["val/ppl"]) and pd.isna(only["config_hash"])
    assert only["surgery/val/ppl"] == STUDY_RECORDS[only["surgery/config_hash"]]["metrics"]["val/ppl"]
    pca = by_key["strided", "standard", "pca"]  # retrained only: the surgery/val/ppl of its own record
    assert pd.isna(pca["surgery/needle/mean"]) and pca["surgery/val/ppl"] == STUDY_RECORDS[pca["config_hash"]]["metrics"]["surgery/val/ppl"]
    # 1 of 40 retrievals (1 context x 5 depths x 8 trials), Agresti-Coull: p' = 3/44
    strided = by_key["strided", "standard", "strided"]
    assert strided["needle/mean"] == 0.025 and strided["needle/stderr"] == pytest.approx((3 / 44 * 41 / 44 / 44) ** 0.5)
    original = table.iloc[0]
    assert original["recipe"] == "original"
    assert original["model.name"] == "tiny_mha"
    assert original["needle/mean"] == STUDY_RECORDS[strided["config_hash"]]["metrics"]["original/needle/mean"]


def test_the_gqa_table_shows_the_mode_and_heads_and_keeps_the_identity_arm(study_out):
    table = read(study_out, "gqa_conversion")
    assert set(table["model.name"]) == {"tiny_gqa"}  # only records of the head-compression evaluation
    rows = {(r["gqa.mode"], r["gqa.kv_heads"]): r for _, r in table.iterrows() if r["recipe"] != "original"}
    assert set(rows) == {("rope_pca", 1), ("svd_a", 2), ("mean_pool", 1)}
    for row in rows.values():
        record = STUDY_RECORDS[row["surgery/config_hash"]]
        assert row["kv.ratio"] == record["kv"]["ratio"] and row["surgery/val/ppl"] == record["metrics"]["val/ppl"]
        assert row["surgery/needle/mean"] == record["metrics"]["needle/mean"]
        assert row["efficiency/ms_per_token_ratio"] == record["metrics"]["efficiency/ms_per_token_ratio"]
    original = table[table["recipe"] == "original"].iloc[0]
    identity = rows["svd_a", 2]  # kv_heads = n_kv: the original's function
    assert identity["kv.ratio"] == 1.0 and identity["surgery/val/ppl"] == pytest.approx(original["val/ppl"], rel=1e-6)
    assert rows["rope_pca", 1]["kv.ratio"] == 0.5
    md = (study_out / "tables" / "gqa_conversion.md").read_text()
    assert "rope_pca" in md and "nan" not in md.lower()
