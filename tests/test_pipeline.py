"""The ablation job: composition, records, skip, locks, corrupt records and resume."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, ROOT, compose_config

import torch

from kv_latent import base_models, records
from kv_latent.config import ConfigError
from kv_latent.pipeline import make_job, make_student, run_job, student_rope
from kv_latent.training.fit import CheckpointError

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir()
          if g.is_dir() and g.name not in ("experiment", "recipe", "hydra")}
TOY = [
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


def config(tmp_path: Path, cache_dir: Path, *overrides: str):
    """A toy-budget job's typed config and resolved dict."""
    return compose_config("config", [f"output_root={tmp_path / 'out'}", f"cache_dir={cache_dir}", *TOY, *overrides])


@pytest.mark.parametrize("group,choice", [(g, c) for g, choices in GROUPS.items() for c in choices])
def test_every_config_choice_composes_and_validates(group, choice, tmp_path, cache_dir):
    import torch

    if group == "trainer" and choice in ("gpu", "fsdp") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    needs = ["gqa.kv_heads=1"] if group == "gqa" and choice != "keep" else []  # a compression names its heads
    cfg, container = config(tmp_path, cache_dir, f"{group}={choice}", *needs)
    if group == "model" and container["model"]["source"] == "hf":
        pytest.skip("hub models need hub access to check their source")
    job = make_job(cfg, container)
    assert job.run_dir.parent.parent == tmp_path / "out" / "runs"


def test_missing_model_path_is_named(tmp_path, cache_dir):
    cfg, container = config(tmp_path, cache_dir, "model=llama3_8b", f"model.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="model.path"):
        make_job(cfg, container)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    """One complete toy-budget job on the embedded tiny_gqa (Stage I then NTP)."""
    tmp = tmp_path_factory.mktemp("job")
    cfg, container = config(tmp, cache_dir, "model=tiny_gqa", "kv.k_dim=32", "kv.v_dim=16", "rope=freq_aware")
    record = run_job(cfg, container, overrides=["model=tiny_gqa", "kv.k_dim=32"])
    return tmp, container, record


def run_dir_of(container: dict) -> Path:
    return Path(container["output_root"]) / "runs" / records.run_name(container)


def test_job_writes_a_complete_record(finished):
    _, container, record = finished
    run_dir = run_dir_of(container)
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert on_disk == json.loads(json.dumps(record, default=str))
    assert on_disk["status"] == "complete" and on_disk["config_hash"] == records.config_hash(container)
    assert on_disk["config"]["kv"] == {"k_dim": 32, "v_dim": 16, "qk_init": "strided", "vo_init": "strided",
                                        "calib_tokens": 16_384, "calib_seq_len": 256}
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
    assert on_disk["rope_as_run"] == "freq_aware" and "_freq_aware_" in on_disk["name"]
    assert on_disk["config"]["data"]["recall_fraction"] == 0.3  # the model's own mix (model.recall_fraction)
    for prefix in ("", "original/"):
        hits = on_disk["items"][f"{prefix}eval/kvl_mmlu/acc"]
        assert len(hits) == 4 and sum(hits) / 4 == metrics[f"{prefix}eval/kvl_mmlu/acc"]  # eval.limit=4
        assert metrics[f"{prefix}eval/kvl_mmlu/chance"] == 0.25
        assert len(on_disk["items"][f"{prefix}needle/mean"]) == 3  # 3 depths x 1 trial
    assert (run_dir / "metrics.csv").exists()
    assert (Path(on_disk["model_dir"]) / "config.json").exists()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / records.HOLDER_FILE).exists()


@pytest.mark.parametrize("overrides,label", [
    (["kv.v_dim=32", "rope=freq_aware"], "standard"),  # full-width keys: the schedule does not apply
    (["kv.v_dim=32", "rope=freq_aware", "rope.at_full_dim=true"], "freq_aware"),
    (["kv.k_dim=32", "rope=freq_aware"], "freq_aware"),
    (["kv.k_dim=32", "kv.qk_init=qk_energy", "kv.calib_tokens=256", "kv.calib_seq_len=32"], "original"),
])
def test_a_run_is_named_by_the_rope_its_student_runs(overrides, label, tmp_path, cache_dir):
    cfg, container = config(tmp_path, cache_dir, *overrides)
    job = make_job(cfg, container)
    assert job.name.startswith(f"tiny_mha/k{cfg.kv.k_dim}") and f"_{label}_keep_" in job.name
    original, tokenizer = base_models.load_base_model(cfg.model, cache_dir=cache_dir, device=torch.device("cpu"))
    assert student_rope(make_student(job, original, tokenizer)) == label


def test_a_head_compressed_job_without_retraining_saves_a_stock_llama(tmp_path, cache_dir):
    cfg, container = config(tmp_path, cache_dir, "model=tiny_gqa", "train=surgery", "gqa=rope_pca", "gqa.kv_heads=1",
                            "gqa.calib_tokens=128", "gqa.calib_seq_len=32", "eval.tasks=[]")
    record = run_job(cfg, container)
    assert record["name"].startswith("tiny_gqa/k64_v64_standard_rope_pca-kv1_surgery-")
    metrics = record["metrics"]
    assert metrics["val/ppl"] == metrics["surgery/val/ppl"] > metrics["original/val/ppl"]
    assert "train/tokens" not in metrics and record["tokens_trained"] == 0
    assert record["kv"] == {"bytes_per_token": 3072, "original_bytes_per_token": 6144, "ratio": 0.5}
    assert metrics["efficiency/kv_bytes_ratio"] == 0.5
    assert len(list((tmp_path / "out" / "calibration").glob("tiny_gqa-*.safetensors"))) == 1
    model_dir = Path(record["model_dir"])
    assert not (model_dir / "modeling.py").exists()  # a stock Llama: nothing to trust
    loaded = json.loads((model_dir / "config.json").read_text())
    assert loaded["model_type"] == "llama" and loaded["num_key_value_heads"] == 1


def test_rerun_skips_a_complete_job(finished):
    _, container, record = finished
    cfg, again_container = compose_config("config", _overrides_of(container))
    again = run_job(cfg, again_container)
    assert again["created"] == record["created"] and again["wall_time_s"] == record["wall_time_s"]


def _overrides_of(container: dict) -> list[str]:
    return [f"output_root={container['output_root']}", f"cache_dir={container['cache_dir']}", *TOY,
            "model=tiny_gqa", "kv.k_dim=32", "kv.v_dim=16", "rope=freq_aware"]


def test_corrupt_record_is_set_aside_and_the_job_reruns(finished, caplog):
    _, container, record = finished
    run_dir = run_dir_of(container)
    good = (run_dir / "record.json").read_text()
    (run_dir / "record.json").write_text(good[: len(good) // 2])  # a truncated write
    cfg, again_container = compose_config("config", _overrides_of(container))
    again = run_job(cfg, again_container)
    (aside,) = run_dir.glob("record.json.corrupt-*")
    assert aside.read_text() == good[: len(good) // 2]
    assert "is not valid JSON" in caplog.text and str(aside) in caplog.text
    assert again["created"] != record["created"] and again["config_hash"] == record["config_hash"]
    assert json.loads((run_dir / "record.json").read_text())["created"] == again["created"]


def test_errors_leave_earlier_records_untouched(finished, tmp_path):
    tmp, container, _ = finished
    before = {p: p.read_bytes() for p in Path(container["output_root"]).rglob("record.json")}
    with pytest.raises(ConfigError):
        cfg, bad = compose_config("config", [*_overrides_of(container), "train.seq_len=100000"])
        run_job(cfg, bad)
    after = {p: p.read_bytes() for p in Path(container["output_root"]).rglob("record.json")}
    assert after == before


def test_corrupt_checkpoint_is_refused_before_training(tmp_path, cache_dir):
    cfg, container = config(tmp_path, cache_dir, "kv.k_dim=32")
    run_dir = run_dir_of(container)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Delete it to restart"):
        run_job(cfg, container)
    assert not (run_dir / "record.json").exists()


def _command(root: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "src/run.py", "model=tiny_gqa", "kv.k_dim=32", "kv.v_dim=16", f"output_root={root}",
            f"cache_dir={cache_dir}", *TOY, "eval.tasks=[kvl_ppl]", "eval.needle.enabled=false",
            "eval.efficiency.enabled=false", *extra]


def test_a_second_launch_waits_for_the_first_and_skips(tmp_path, cache_dir):
    """Two real processes launch the same job at once: one trains and writes the record, the other
    waits for it (naming the holder), then finds the record complete."""
    cmd = _command(tmp_path, cache_dir, "train.tokens=4096")
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.rglob(records.HOLDER_FILE)) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out_first = first.communicate(timeout=600)[0]
    out_second = second.stdout + second.stderr  # Hydra's job log goes to stdout
    assert first.returncode == 0, out_first
    assert second.returncode == 0, out_second
    assert f"is being run by pid {first.pid}" in out_second and "complete record exists" in out_second
    (record,) = tmp_path.rglob("record.json")
    csv_rows = (record.parent / "metrics.csv").read_text().splitlines()
    assert len({len(r.split(",")) for r in csv_rows}) == 1  # one writer: one header, consistent rows


def test_a_dead_holders_lock_is_taken_over(tmp_path, cache_dir, caplog):
    """A job killed while holding its run directory leaves a holder file; the next launch takes over."""
    cfg, container = config(tmp_path, cache_dir, "kv.k_dim=32", "eval.tasks=[]", "eval.needle.enabled=false",
                            "eval.efficiency.enabled=false")
    run_dir = run_dir_of(container)
    holder = subprocess.run(
        [sys.executable, "-c", "import os, sys; from kv_latent import records; "
         "cm = records.run_lock(sys.argv[1]); cm.__enter__(); os._exit(9)", str(run_dir)], capture_output=True)
    assert holder.returncode == 9 and (run_dir / records.HOLDER_FILE).exists()
    record = run_job(cfg, container)
    assert record["status"] == "complete" and "ended without releasing it" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("signal_name,status", [("SIGKILL", -9), ("SIGTERM", 143)])
def test_killed_job_resumes_to_the_uninterrupted_weights(tmp_path, cache_dir, signal_name, status):
    """Kill a job (SIGKILL: at once; SIGTERM: it checkpoints where it is and exits 143) after its
    first checkpoint, relaunch the same command: the same final weights as an uninterrupted run,
    and a training curve that covers the whole run."""
    import signal

    import pandas as pd
    import torch
    from safetensors.torch import load_file

    def command(root: Path) -> list[str]:
        return _command(root, cache_dir, "train.tokens=19200", "train.checkpoint_every=30", "train.log_every=1")

    subprocess.run(command(tmp_path / "a"), cwd=ROOT, check=True, capture_output=True)
    (record_a,) = (tmp_path / "a").rglob("record.json")

    proc = subprocess.Popen(command(tmp_path / "b"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "b").rglob("last.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, getattr(signal, signal_name))
    assert proc.wait(timeout=300) == status
    assert not list((tmp_path / "b").rglob("record.json")), "the job finished before it could be killed"
    subprocess.run(command(tmp_path / "b"), cwd=ROOT, check=True, capture_output=True)
    (record_b,) = (tmp_path / "b").rglob("record.json")

    b = json.loads(record_b.read_text())
    assert b["metrics"]["train/resumed_from_step"] > 0
    weights_a = load_file(Path(json.loads(record_a.read_text())["model_dir"]) / "model.safetensors")
    weights_b = load_file(Path(b["model_dir"]) / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    curve = pd.read_csv(record_b.parent / "metrics.csv")
    assert curve["step"].min() < b["metrics"]["train/resumed_from_step"]  # rows from before the kill kept


@pytest.mark.parametrize("launcher,target", [("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_sweep_launchers_compose(launcher, target):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
