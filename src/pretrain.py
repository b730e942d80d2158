"""kv-latent base models: build an embedded model by the steps of a recipe, then export it.

    python src/pretrain.py recipe=scratch model=tiny_mha trainer=gpu export=true   # from scratch
    python src/pretrain.py recipe=copy_circuit model=tiny_mha export=true          # retrieval (CPU)
    python src/pretrain.py --cfg job                                               # the composed config

The recipes live in conf/recipe/; the schema is kv_latent.config.PretrainConfig. Each step is a
run of its own under <output_root>/pretrain/<model>/ (complete steps are skipped on a rerun).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from hydra_entry import run_reporting, task_overrides, typed
from kv_latent.pretrain import run_pretrain


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    def work():
        recipe, container = typed(cfg)
        return run_pretrain(recipe, container, overrides=task_overrides())

    run_reporting(work)


if __name__ == "__main__":
    main()
