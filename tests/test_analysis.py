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
TABLES = ["main", "k_versus_v", "k_versus_v_summary", "efficiency", "rope_stability", "ablation_rope", "ablation_stages",
          "ablation_lora"]
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


@pytest.mark.parametrize("name", [t for t in TABLES if t not in ("rope_stability", "k_versus_v_summary")])
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
    cells = needle[REFERENCE]  # a cell's panel is keyed by its config hash(es)
    depth, context = cells["depth"].index(0.5), cells["context"].index(1024)
    assert cells["values"][depth][context] == RECORDS[REFERENCE]["metrics"]["needle/ctx1024/depth50"]
    assert NO_MMLU not in needle  # no needle results: no panel


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
    wandb.teardown()  # the settings an earlier run in this process fixed (its WANDB_DIR) go with it
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
    by_key = {(r["kv.qk_init"], r["rope_as_run"], r["kv.vo_init"]): r for _, r in table.iterrows() if r["recipe"] != "original"}
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


# Seeds, eval items and the K-versus-V tables: synthetic records (a real study record with its dims,
# RoPE, seed, metrics and per-item scores edited), written to a temporary directory.

SEEDED_BASE = json.loads(
    (STUDIES / "runs" / "tiny_mha" / "k32_v64_standard_keep_intra+ntp-f25e78ec4c" / "record.json").read_text())
CHANCE = 0.25  # the chance rate of both synthetic 4-way benchmarks
# K-versus-V arms: (protocol, d_qk, d_vo) -> the val perplexity of each seed and the needle success.
SEEDED_ARMS = {
    ("standard", 64, 64): ([36.9], 0.9),
    ("standard", 32, 64): ([36.0, 37.0, 38.0], 0.2),  # cut K: 37.00 ± 1.00
    ("standard", 64, 32): ([40.0, 41.0, 42.0], 0.6),  # cut V: 41.00 ± 1.00, exceeds noise
    ("standard", 32, 32): ([45.0], 0.1),
    ("standard", 16, 16): ([60.0], 0.0),
    ("freq_aware@every_dim", 32, 64): ([37.0, 37.5, 38.0], 0.5),
    ("freq_aware@every_dim", 64, 32): ([37.2, 37.6, 38.4], 0.5),  # within noise, the same needle items
    ("freq_aware@reduced", 32, 64): ([38.9], 0.3),
    ("freq_aware@reduced", 64, 32): ([37.3], 0.3),  # one seed each; the (64, 32) arm ran standard RoPE
    ("freq_matched", 32, 64): ([38.5], 0.4),  # its cut-V arm is the standard protocol's job
}
PROTOCOL_CONFIG = {  # protocol -> (rope.schedule, rope.at_full_dim, kv.qk_init)
    "standard": ("standard", False, "strided"),
    "freq_aware@every_dim": ("freq_aware", True, "strided"),
    "freq_aware@reduced": ("freq_aware", False, "strided"),
    "freq_matched": ("freq_aware", False, "freq_matched"),
}


def item_scores(share: float, n: int, seed: int = 0) -> list[float]:
    """n 0/1 scores, round(share * n) of them 1, rotated by ``seed`` (another seed, the same items)."""
    import numpy as np

    return np.roll(np.arange(n) < round(share * n), seed).astype(float).tolist()


def seeded_record(protocol: str, k: int, v: int, seed: int, ppl: float, needle: float) -> dict:
    """A complete record of tiny_mha at (k, v) under ``protocol``, with per-item scores: MMLU-like
    at chance (25 % of 200), ARC-like above it (60 % of 200), the needle at ``needle`` of 120 trials."""
    import copy
    import math

    from kv_latent.records import config_hash

    record = copy.deepcopy(SEEDED_BASE)
    schedule, at_full_dim, qk_init = PROTOCOL_CONFIG[protocol]
    config = record["config"]
    config["kv"].update(k_dim=k, v_dim=v, qk_init=qk_init)
    config["rope"].update(schedule=schedule, at_full_dim=at_full_dim)
    config["train"]["seed"] = seed
    items = {"eval/kvl_mmlu/acc": item_scores(0.25, 200, seed), "eval/kvl_arc/acc": item_scores(0.6, 200, seed),
             "needle/mean": item_scores(needle, 120, seed), "original/eval/kvl_mmlu/acc": item_scores(0.26, 200),
             "original/eval/kvl_arc/acc": item_scores(0.7, 200), "original/needle/mean": item_scores(0.9, 120)}
    record["items"] = items
    record["metrics"] = {
        "val/ppl": ppl, "val/loss": math.log(ppl), "original/val/ppl": 36.9,
        **{key: sum(values) / len(values) for key, values in items.items()},
        "eval/kvl_mmlu/chance": CHANCE, "eval/kvl_arc/chance": CHANCE,
    }
    record["kv"] = {"bytes_per_token": 96 * (k + v), "original_bytes_per_token": 12288, "ratio": (k + v) / 128}
    record["config_hash"] = config_hash(config)
    record["name"] = f"tiny_mha/k{k}_v{v}_{protocol}_seed{seed}-{record['config_hash']}"
    record["code"] = {"commit": f"{seed}" * 40, "dirty": False}  # one commit per seed: the footnote names each
    return record


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, dict[tuple[str, int, int], list[dict]]]:
    """The synthetic records on disk and make_tables' output on them; the records by arm."""
    root = tmp_path_factory.mktemp("seeded")
    arms = {}
    for (protocol, k, v), (ppls, needle) in SEEDED_ARMS.items():
        arms[protocol, k, v] = [seeded_record(protocol, k, v, seed, ppl, needle) for seed, ppl in enumerate(ppls)]
        for record in arms[protocol, k, v]:
            path = root / "runs" / record["name"] / "record.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(record))
    make_tables.main([str(root / "runs"), "--out", str(root / "out")])
    return root / "out", arms


def read_md(out: Path, name: str) -> pd.DataFrame:
    """A table's Markdown as strings, indexed by its config_hash cell, columns by header (units included)."""
    lines = [line for line in (out / "tables" / f"{name}.md").read_text().splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return pd.DataFrame(rows[2:], columns=rows[0]).set_index("config_hash", drop=False)


def kv_row(table: pd.DataFrame, protocol: str, k: int, v: int) -> pd.Series:
    rows = table[(table["protocol"] == protocol) & (table["kv.k_dim"] == k) & (table["kv.v_dim"] == v)]
    assert len(rows) == 1, (protocol, k, v)
    return rows.iloc[0]


def test_rope_as_run_is_what_ran():
    from analysis.figures import label
    from analysis.frame import record_row, rope_as_run

    reduced_v = seeded_record("freq_aware@reduced", 64, 32, 0, 37.3, 0.3)  # rope=freq_aware rope.at_full_dim=false
    assert rope_as_run(reduced_v) == "standard"
    assert rope_as_run(seeded_record("freq_aware@reduced", 32, 64, 0, 38.9, 0.3)) == "freq_aware"
    assert rope_as_run(seeded_record("freq_aware@every_dim", 64, 32, 0, 37.2, 0.5)) == "freq_aware"
    assert rope_as_run({**reduced_v, "rope_as_run": "freq_aware"}) == "freq_aware"  # the record's own field wins
    row = pd.Series(record_row(reduced_v, source="x", run_dir=None))
    assert label(row) == "64/32 standard intra+ntp"


def test_rope_as_run_in_the_tables(seeded):
    out, _ = seeded
    table = read(out, "k_versus_v")
    assert kv_row(table, "freq_aware@reduced", 64, 32)["rope_as_run"] == "standard"
    assert kv_row(table, "freq_aware@reduced", 32, 64)["rope_as_run"] == "freq_aware"
    assert "rope.schedule" not in read(out, "main").columns
    main = read(out, "main")
    assert set(main.loc[main["kv.k_dim"] == 64, "rope_as_run"]) == {"standard", "freq_aware"}  # every_dim ran freq_aware


def test_seeds_merge_into_one_cell(seeded):
    import numpy as np

    from analysis.stats import DDOF

    out, arms = seeded
    assert DDOF == 1  # sample std: 36, 37, 38 -> 1.00 (numpy's default ddof=0 would give 0.82)
    table = read(out, "k_versus_v")
    cut_k = kv_row(table, "standard", 32, 64)
    assert cut_k["val/ppl"] == pytest.approx(37.0) and cut_k["n"] == 3
    assert cut_k["val/ppl_std"] == pytest.approx(np.std([36.0, 37.0, 38.0], ddof=DDOF)) == pytest.approx(1.0)
    assert set(cut_k["config_hash"].split("+")) == {r["config_hash"] for r in arms["standard", 32, 64]}
    single = kv_row(table, "standard", 32, 32)
    assert single["n"] == 1 and pd.isna(single["val/ppl_std"])
    md = read_md(out, "k_versus_v")
    assert (md.loc[cut_k["config_hash"], "val/ppl (± std)"], md.loc[cut_k["config_hash"], "n"]) == ("37.0 ± 1.0", "3")
    assert (md.loc[single["config_hash"], "val/ppl (± std)"], md.loc[single["config_hash"], "n"]) == ("45", "1")
    sources = pd.read_csv(out / "tables" / "k_versus_v.sources.csv")
    assert {r["config_hash"] for rs in arms.values() for r in rs} == set(sources["config_hash"])
    footnote = (out / "tables" / "k_versus_v.md").read_text().splitlines()[-1]
    assert footnote.startswith("Sources: 18 run records at commit(s) 0000000000, 1111111111, 2222222222;")


def test_bootstrap_interval_of_a_known_vector():
    import numpy as np

    from analysis.stats import difference_interval, interval

    scores = np.array(item_scores(0.3, 400))[None, :]  # (seeds, items)
    low, high = interval(scores)
    assert (low, high) == interval(scores)  # a fixed Generator seed: the same interval every time
    assert low < 0.3 < high
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 400), rel=0.1)
    stacked = np.stack([scores[0], np.roll(scores[0], 1)])  # two seeds on the same items
    assert stacked.mean() == 0.3 and interval(stacked)[0] < 0.3 < interval(stacked)[1]
    assert difference_interval(scores, scores) == (0.0, 0.0)  # paired: an arm against itself never differs
    assert np.isnan(difference_interval(scores, scores[:, :200])[0])  # not the same items: no interval


def test_a_benchmark_at_chance_is_marked_and_not_averaged(seeded):
    import numpy as np

    from analysis.stats import at_chance, interval

    low, high = interval(np.array(item_scores(0.25, 200))[None, :])
    assert at_chance(low, high, CHANCE)
    low, high = interval(np.array(item_scores(0.6, 200))[None, :])
    assert not at_chance(low, high, CHANCE)
    out, _ = seeded
    main = read(out, "main")
    students = main[main["recipe"] != "original"]
    assert students["eval/kvl_mmlu/acc_at_chance"].all() and not students["eval/kvl_arc/acc_at_chance"].any()
    assert (students["eval/kvl_mmlu/acc_ci_lo"] < CHANCE).all() and (students["eval/kvl_mmlu/acc_ci_hi"] > CHANCE).all()
    # benchmark_avg leaves MMLU out: the average is the ARC accuracy alone
    assert students["benchmark_avg"].to_numpy() == pytest.approx(students["eval/kvl_arc/acc"].to_numpy())
    md = read_md(out, "main")
    mmlu, arc = md["eval/kvl_mmlu/acc (%, ± std, [95% CI])"], md["eval/kvl_arc/acc (%, ± std, [95% CI])"]
    assert mmlu.str.fullmatch(r"2[56]\.0( ± 0\.0)? \[\d+\.\d, \d+\.\d\] at chance").all()  # the original too
    assert arc.str.fullmatch(r"[67]0\.0( ± 0\.0)? \[\d+\.\d, \d+\.\d\]").all()
    note = (out / "tables" / "main.md").read_text()
    assert "benchmark_avg leaves out, per model, each benchmark some of its rows score at chance (tiny_mha: " \
           "eval/kvl_mmlu/acc)" in note


def test_k_versus_v_rows_per_protocol(seeded):
    out, arms = seeded
    table = read(out, "k_versus_v")
    students = table[table["recipe"] != "original"]
    standard = students[students["protocol"] == "standard"]
    assert list(zip(standard["kv.k_dim"], standard["kv.v_dim"])) == [(64, 64), (32, 64), (64, 32), (32, 32), (16, 16)]
    assert list(dict.fromkeys(students["protocol"])) == ["standard", "freq_aware@every_dim", "freq_matched",
                                                          "freq_aware@reduced"]
    matched = students[students["protocol"] == "freq_matched"]  # its full-K arms are the standard jobs
    assert list(zip(matched["kv.k_dim"], matched["kv.v_dim"], matched["rope_as_run"])) == [
        (64, 64, "standard"), (32, 64, "freq_aware"), (64, 32, "standard")]
    assert kv_row(table, "freq_matched", 64, 32)["config_hash"] == kv_row(table, "standard", 64, 32)["config_hash"]
    needle = kv_row(table, "standard", 32, 64)
    assert needle["needle/mean"] == pytest.approx(0.2)
    assert needle["needle/mean_ci_lo"] < 0.2 < needle["needle/mean_ci_hi"]
    assert table.iloc[0]["recipe"] == "original" and table.iloc[0]["needle/mean"] == pytest.approx(0.9)


def test_k_versus_v_summary_verdicts(seeded):
    import math

    out, _ = seeded
    summary = read(out, "k_versus_v_summary").set_index("protocol")
    standard = summary.loc["standard"]
    assert standard["diff/val/ppl"] == pytest.approx(37.0 - 41.0)
    assert standard["diff/val/ppl_se"] == pytest.approx(math.sqrt(1 / 3 + 1 / 3))
    assert standard["verdict/val/ppl"] == "exceeds noise"
    assert standard["diff/needle/mean"] == pytest.approx(0.2 - 0.6) and standard["diff/needle/mean_ci_hi"] < 0
    assert standard["verdict/needle/mean"] == "exceeds noise"
    every = summary.loc["freq_aware@every_dim"]
    assert every["verdict/val/ppl"] == "within noise" and abs(every["diff/val/ppl"]) < 2 * every["diff/val/ppl_se"]
    assert every["verdict/needle/mean"] == "within noise"  # the same needle items in both arms: no difference
    reduced = summary.loc["freq_aware@reduced"]
    assert reduced["verdict/val/ppl"] == "one seed: noise unknown" and pd.isna(reduced["diff/val/ppl_se"])
    assert (reduced["cut_k/rope_as_run"], reduced["cut_v/rope_as_run"]) == ("freq_aware", "standard")
    matched = summary.loc["freq_matched"]
    assert (matched["cut_k/rope_as_run"], matched["cut_v/rope_as_run"]) == ("freq_aware", "standard")
    assert matched["cut_v/config_hash"] == standard["cut_v/config_hash"]
    assert matched["verdict/val/ppl"] == "one seed: noise unknown"  # the K arm has one seed
    assert (summary["cut_k/kv.ratio"] == 0.75).all()
