"""What the two entry points (``src/run.py``, ``src/pretrain.py``) share (DESIGN.md §3.1, §3.5).

Only the entry points touch Hydra: here the library's typed schemas are registered with Hydra's
ConfigStore (so composing a config checks types, keys and choices), a composed ``DictConfig``
becomes the library's dataclasses, errors become one readable line and an exit code, and a sweep
ends with a summary table of its jobs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default run needs no hub; a hub model overrides it
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from kv_latent.config import AblationConfig, ConfigError, PretrainConfig  # noqa: E402
from kv_latent.records import CorruptRecord, read_record  # noqa: E402
from kv_latent.training.fit import CheckpointError, TrainingInterrupted  # noqa: E402

log = logging.getLogger("kv_latent")
OUTCOME_FILE = "job_outcome.json"  # in Hydra's job dir: which record a job wrote or found

ConfigStore.instance().store(name="ablation_schema", node=AblationConfig)
ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def typed(cfg: DictConfig) -> tuple[Any, dict[str, Any]]:
    """The composed config as the library's dataclasses (their checks run here) and as the
    resolved plain dict a record stores; paths are made absolute first. A key the schema does not
    know is refused even when added with ``+``."""
    for key in ("output_root", "cache_dir"):
        cfg[key] = str(Path(cfg[key]).expanduser().resolve())
    OmegaConf.merge(OmegaConf.structured(OmegaConf.get_type(cfg)), OmegaConf.to_container(cfg))
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return OmegaConf.to_object(cfg), container


def sweep_group() -> str | None:
    """The sweep's name (its output dir), the W&B group of its jobs; None for a single run."""
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def run_reporting(work: Callable[[], list[dict[str, Any]]]) -> None:
    """Run ``work`` (which returns the records it wrote or found), log one line per record and
    note them for the sweep summary; a user error becomes one line and exit status 2, a
    preemption (SIGTERM) exit status 143."""
    try:
        done = work()
    except (ConfigError, CheckpointError) as err:
        log.error("invalid configuration: %s", err)
        sys.exit(2)
    except TrainingInterrupted as err:
        log.error("%s", err)
        sys.exit(143)
    for record in done:
        log.info("%s", summary_line(record))
    outcome = Path(HydraConfig.get().runtime.output_dir) / OUTCOME_FILE
    outcome.write_text(json.dumps([str(Path(r["model_dir"]).parent) for r in done]))


def summary_line(record: dict[str, Any]) -> str:
    m = record["metrics"]
    original = m.get("original/val/ppl")
    kv = record.get("kv", {}).get("ratio")
    return (f"{record['name']}: val/ppl {m.get('val/ppl', float('nan')):.3f}"
            + (f" (original {original:.3f})" if original is not None else "")
            + (f", KV {kv:.1%} of the original" if kv is not None else "")
            + f", {record['wall_time_s']:.0f} s -> {record['model_dir']}")


class SweepSummary(Callback):
    """At the end of a sweep, one table of its jobs: what ran, what it scored, what failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import pandas as pd

        rows = []
        for job_dir in sorted(Path(str(config.hydra.sweep.dir)).glob("*/"), key=lambda p: p.name.zfill(6)):
            outcome = job_dir / OUTCOME_FILE
            if not outcome.exists():
                rows.append({"job": job_dir.name, "run": "(failed: see its log)"})
                continue
            for run_dir in json.loads(outcome.read_text()):
                try:
                    record = read_record(Path(run_dir))
                except CorruptRecord as err:
                    rows.append({"job": job_dir.name, "run": f"(unreadable: {err})"})
                    continue
                m = record["metrics"]
                rows.append({"job": job_dir.name, "run": record["name"], "val/ppl": m.get("val/ppl"),
                             "original/val/ppl": m.get("original/val/ppl"), "surgery/val/ppl": m.get("surgery/val/ppl"),
                             "needle/mean": m.get("needle/mean"), "kv ratio": record.get("kv", {}).get("ratio"),
                             "wall s": record["wall_time_s"]})
        if rows:
            table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f")
            log.info("sweep %s: %d jobs\n%s", Path(str(config.hydra.sweep.dir)).name, len(rows), table)
