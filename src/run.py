"""kv-latent ablations: one Hydra job = surgery -> retrain -> evaluation -> run record.

    python src/run.py                                                  # one job with the defaults
    python src/run.py -m kv.k_dim=32,64 kv.v_dim=32,64 rope=freq_aware # a 2x2 sweep
    python src/run.py --cfg job                                        # print the composed config

Config groups live in conf/ (model, kv, rope, gqa, train, trainer, data, eval, logger; studies in
experiments/ as +experiment=<name>); their schema is kv_latent.config.AblationConfig. Base models
are built by src/pretrain.py. Only the entry points touch Hydra (src/hydra_entry.py).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from hydra_entry import run_reporting, sweep_group, task_overrides, typed
from kv_latent.pipeline import run_job


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    def work():
        ablation, container = typed(cfg)
        return [run_job(ablation, container, group=sweep_group(), overrides=task_overrides())]

    run_reporting(work)


if __name__ == "__main__":
    main()
