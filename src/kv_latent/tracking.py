"""Where a job's metrics go: a ``metrics.csv`` beside its record, and a W&B run (DESIGN.md §3.3).

The W&B run is offline by default and never hangs a sweep: ``logger.mode=online`` gives W&B
``logger.init_timeout`` seconds to reach its server, then logs offline with a warning that says
how to sync the run later. W&B runs quiet (no history and summary dump at the end of each job);
closing a run logs one line with its page, or for an offline run its directory and how to sync it.

A run's config is the job's resolved config plus flat dashboard fields (:func:`run_fields`:
``kv.k_dim``, ``rope.schedule`` as run, ``train.recipe``, ...) that a W&B workspace or report groups
and filters by (``analysis/dashboard.py``); its summary ends with the record's final metrics.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kv_latent.config import LoggerConfig, LoggerName, WandbMode, recipe_name
from kv_latent.files import atomic_write_text
from kv_latent.records import config_hash, rope_label

log = logging.getLogger(__name__)
METRICS_CSV = "metrics.csv"


@dataclass
class JobLoggers:
    """The Lightning loggers of one job and its W&B run (None without W&B)."""

    lightning: list[Any]
    run: Any = None
    offline_fallback: bool = False
    earlier_csv: Path | None = None  # a resumed job's rows from before the resume

    def _merge_earlier_csv(self, csv: Path) -> None:
        import pandas as pd

        earlier, later = pd.read_csv(self.earlier_csv), pd.read_csv(csv)
        merged = pd.concat([earlier[earlier["step"] < later["step"].min()], later], ignore_index=True)
        atomic_write_text(csv, merged.to_csv(index=False))
        self.earlier_csv.unlink()

    def finish(self, metrics: dict[str, Any]) -> None:
        """Log the record's final numbers, so the dashboard and the CSV end with them."""
        final = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for logger in self.lightning:
            logger.log_metrics(final)
            logger.save()
        if self.earlier_csv is not None:
            self._merge_earlier_csv(Path(self.lightning[0].log_dir) / METRICS_CSV)
        if self.run is not None:
            self.run.summary.update(final)

    def close(self) -> None:
        """End the W&B run (the basic Hydra launcher runs every job of a sweep in one process) and
        log where it is: its page, or for an offline run its directory and the command that
        uploads it."""
        if self.run is None:
            return
        run, self.run = self.run, None
        offline = run.settings.mode == "offline"
        where = run.settings.sync_dir if offline else run.url  # an offline run's url is a warning
        run.finish()
        if offline:
            log.info("W&B run saved offline; upload it with `wandb sync %s`", where)
        else:
            log.info("W&B run: %s", where)


def run_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The flat, named W&B config fields a dashboard slices a job's runs by, from its resolved config.

    ``rope.schedule`` is the RoPE the student runs (:func:`kv_latent.records.rope_label`), the one the
    tables show; the schedule asked for is ``rope.schedule_asked``. ``gqa.kv_heads`` is the KV heads
    the student has (the model's own when heads are kept). Flat dotted keys sit beside the nested
    config in W&B (``config.kv.k_dim.value`` versus ``config.kv.value.k_dim``), so neither hides the other.
    """
    model, kv, rope, gqa, train = (config[s] for s in ("model", "kv", "rope", "gqa", "train"))
    return {
        "kv.k_dim": kv["k_dim"], "kv.v_dim": kv["v_dim"],
        "kv.qk_init": kv.get("qk_init", "strided"), "kv.vo_init": kv.get("vo_init", "strided"),
        "rope.schedule": rope_label(config), "rope.schedule_asked": rope["schedule"],
        "rope.at_full_dim": rope.get("at_full_dim", False),
        "gqa.mode": gqa["mode"], "gqa.kv_heads": gqa.get("kv_heads") or model["num_key_value_heads"],
        "train.seed": train["seed"], "train.recipe": recipe_name(train["stages"]),
        "model.name": model["name"], "eval.name": config["eval"]["name"], "config_hash": config_hash(config),
    }


def job_loggers(
    cfg: LoggerConfig, run_dir: Path, *, name: str, group: str | None, config: dict[str, Any], tags: list[str]
) -> JobLoggers:
    """A CSV logger into ``run_dir`` and, with ``logger.name=wandb``, a W&B run there too, whose config
    is the job's resolved ``config`` plus its :func:`run_fields`."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    # Lightning's CSV logger deletes an existing metrics.csv: a resumed job keeps its rows aside and
    # merges them back at the end, so its curve covers the whole run.
    earlier = Path(run_dir) / METRICS_CSV
    kept = earlier.with_name(f".{METRICS_CSV}.before-resume")
    if earlier.exists():
        os.replace(earlier, kept)
    kept = kept if kept.exists() else None
    csv = CSVLogger(save_dir=run_dir, name="", version="")
    with warnings.catch_warnings():
        # Lightning's note that the run dir is not empty: it never is (its lock, W&B's files), and
        # the only log file Lightning would replace, metrics.csv, is set aside above.
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        csv.experiment  # made now, under that filter, rather than at the first logged metric
    if cfg.name == LoggerName.none or cfg.mode == WandbMode.disabled:
        return JobLoggers([csv], earlier_csv=kept)
    run, fallback = wandb_run(cfg, run_dir, name=name, group=group, config={**config, **run_fields(config)},
                              tags=tags)
    return JobLoggers([csv, WandbLogger(experiment=run)], run, fallback, kept)


def wandb_run(
    cfg: LoggerConfig, run_dir: Path, *, name: str, group: str | None, config: dict[str, Any], tags: list[str]
) -> tuple[Any, bool]:
    """Start the job's W&B run, quiet (W&B's own warnings and errors still show); return it and
    whether it fell back from online to offline."""
    import wandb

    kwargs = dict(project=cfg.project, entity=cfg.entity, name=name, group=group, tags=tags, config=config,
                  dir=str(run_dir), reinit="finish_previous")
    if cfg.mode == WandbMode.online:
        try:
            settings = wandb.Settings(init_timeout=cfg.init_timeout, quiet=True)
            return wandb.init(mode="online", settings=settings, **kwargs), False
        except Exception as err:  # wandb raises several types (CommError, UsageError, timeouts)
            log.warning(
                "W&B did not start online within logger.init_timeout=%.0f s (%s: %s); logging offline "
                "instead. Sync later with `wandb sync %s/wandb/offline-run-*`.",
                cfg.init_timeout, type(err).__name__, err, run_dir,
            )
            wandb.finish()
    return wandb.init(mode="offline", settings=wandb.Settings(quiet=True), **kwargs), cfg.mode == WandbMode.online
