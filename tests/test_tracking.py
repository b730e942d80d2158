"""W&B: an offline run read back from its file holds the job's group, tags, config and summary; online
without a server falls back to offline within the timeout instead of hanging; closing a run says in
one line how to sync it, without W&B's history and summary dump."""

import json
import logging
import struct
import time
import warnings
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from kv_latent.config import LoggerConfig
from kv_latent.tracking import job_loggers

ROOT = Path(__file__).resolve().parents[1]
# A committed record of the design-card study: a job's resolved config, and the run fields it gives.
RECORD = ROOT / "analysis/results/design_card/runs/tiny_mha/k64_v64_freq_aware_keep_intra+ntp-eb045df6d9/record.json"
FIELDS = {"kv.k_dim": 64, "kv.v_dim": 64, "kv.qk_init": "strided", "kv.vo_init": "strided",
          "rope.schedule": "standard", "rope.schedule_asked": "freq_aware", "rope.at_full_dim": False,
          "gqa.mode": "keep", "gqa.kv_heads": 4, "train.seed": 0, "train.recipe": "intra+ntp",
          "model.name": "tiny_mha", "eval.name": "quick", "config_hash": "eb045df6d9"}
BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + magic + version


def read_wandb_file(path: Path) -> list:
    """The records of a ``.wandb`` transaction log (LevelDB log framing: 32 KiB blocks of chunks,
    each ``crc32 (4) | length (2, little endian) | type (1)``, type 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run_file(run_dir: Path) -> Path:
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return path


def job_config() -> dict:
    return json.loads(RECORD.read_text())["config"]


def test_an_offline_run_carries_group_tags_config_and_summary(tmp_path):
    config = job_config()
    loggers = job_loggers(LoggerConfig(), tmp_path, name="tiny_mha/k64_v64", group="sweep_x",
                          config=config, tags=["k_dim=64", "rope=standard"])
    assert {k: loggers.run.config[k] for k in FIELDS} == FIELDS  # in-process
    loggers.lightning[1].log_metrics({"train/loss": 3.5}, step=1)
    final = {"val/ppl": 37.5, "needle/mean": 0.5, "efficiency/kv_bytes_ratio": 1.0, "kv/ratio": 0.75,
             "note": "not a number"}
    loggers.finish(final)
    assert {k: loggers.run.summary[k] for k in final if k != "note"} == {k: v for k, v in final.items() if k != "note"}
    loggers.close()
    records = read_wandb_file(offline_run_file(tmp_path))
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.run_group == "sweep_x" and list(run.tags) == ["k_dim=64", "rope=standard"]
    assert run.display_name == "tiny_mha/k64_v64"
    written = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert written["kv"] == config["kv"]  # the nested resolved config, as a record holds it
    assert {k: written[k] for k in FIELDS} == FIELDS  # and the flat dashboard fields beside it
    summary = {item.key: item.value_json for r in records if r.HasField("summary") for item in r.summary.update}
    assert float(summary["val/ppl"]) == 37.5 and float(summary["needle/mean"]) == 0.5 and "note" not in summary
    assert "val/ppl" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_online_without_a_server_falls_back_to_offline_in_time(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    started = time.perf_counter()
    loggers = job_loggers(LoggerConfig(mode="online", init_timeout=3), tmp_path, name="n", group=None,
                          config=job_config(), tags=[])
    took = time.perf_counter() - started
    assert loggers.offline_fallback and loggers.run.settings.mode == "offline"
    loggers.close()
    assert took < 60
    assert offline_run_file(tmp_path).exists()


def test_closing_an_offline_run_says_how_to_sync_it_in_one_line(tmp_path, caplog, capfd):
    (tmp_path / ".lock").write_text("a run dir is never empty")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = job_loggers(LoggerConfig(), tmp_path, name="n", group=None, config=job_config(), tags=[])
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    loggers.lightning[1].log_metrics({"train/loss": 3.5}, step=1)
    loggers.finish({"val/ppl": 37.5})
    with caplog.at_level(logging.INFO, logger="kv_latent.tracking"):
        loggers.close()
    run_dir = offline_run_file(tmp_path).parent
    assert [r.getMessage() for r in caplog.records if r.name == "kv_latent.tracking"] == [
        f"W&B run saved offline; upload it with `wandb sync {run_dir}`"
    ]
    console = capfd.readouterr()
    assert "Run history" not in console.err + console.out and "Run summary" not in console.err + console.out
