"""kv-latent entry point: one Hydra job = surgery -> retrain -> evaluation -> run record.

    python src/run.py                                                  # one job with the defaults
    python src/run.py -m kv.k_dim=32,64 kv.v_dim=32,64 rope=freq_aware # a 2x2 sweep
    python src/run.py train=pretrain model=tiny_mha export=true        # rebuild an embedded model
    python src/run.py --cfg job                                        # print the composed config

Config groups live in conf/ (model, kv, rope, gqa, train, trainer, data, logger). Only this file
touches DictConfig; the library takes typed configs (kv_latent.pipeline.make_job).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default run needs no hub; a hub model overrides it
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from kv_latent.config import ConfigError  # noqa: E402
from kv_latent.pipeline import run_job  # noqa: E402

log = logging.getLogger("kv_latent")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    container = OmegaConf.to_container(cfg, resolve=True)
    container["output_root"] = str(Path(container["output_root"]).expanduser().resolve())
    container["cache_dir"] = str(Path(container["cache_dir"]).expanduser().resolve())
    hydra_cfg = HydraConfig.get()
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        record = run_job(container, group=group, overrides=list(hydra_cfg.overrides.task))
    except ConfigError as err:
        log.error("invalid configuration: %s", err)
        sys.exit(2)
    if not record:  # a non-zero DDP rank: rank 0 reports
        return
    m = record["metrics"]
    log.info(
        "%s: val/ppl %.3f (original %s), KV %s B/token, %.0f s -> %s",
        record["name"],
        m.get("val/ppl", float("nan")),
        f"{m['original/val/ppl']:.3f}" if "original/val/ppl" in m else "n/a",
        record["kv"]["bytes_per_token"],
        record["wall_time_s"],
        record["model_dir"],
    )


if __name__ == "__main__":
    main()
