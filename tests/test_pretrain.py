"""The base-model workflow (src/pretrain.py): a recipe's steps chain, skip when complete, export."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import compose_config

from kv_latent import base_models
from kv_latent.config import ConfigError, NeedleConfig
from kv_latent.evaluation import quality
from kv_latent.pretrain import run_pretrain

STEP = {"stages": ["pretrain"], "tokens": 128, "batch_size": 2, "seq_len": 32, "checkpoint_every": 2, "log_every": 1}


def recipe(tmp_path: Path, cache_dir: Path, *overrides: str):
    """A two-step continued pre-training recipe of tiny_gqa at a toy budget (a recipe file found
    on Hydra's search path, as a user's own recipe would be)."""
    steps = [{"name": name, "train": {**STEP, "seed": i},
              "data": {"seq_len": "${..train.seq_len}", "eval_max_blocks": 2, "recall_fraction": 0.5 * i}}
             for i, name in enumerate(["first", "second"])]
    conf = tmp_path / "conf"
    (conf / "recipe").mkdir(parents=True, exist_ok=True)
    toy = {"name": "toy", "init": "original", "steps": steps}
    (conf / "recipe" / "toy.yaml").write_text("# @package _global_\n" + json.dumps(toy))
    base = [f"output_root={tmp_path / 'out'}", f"cache_dir={cache_dir}", "model=tiny_gqa", "recipe=toy",
            "trainer.enable_progress_bar=false", f"hydra.searchpath=[file://{conf}]"]
    return compose_config("pretrain", [*base, *overrides])


def test_steps_chain_and_export_the_whole_provenance(tmp_path, cache_dir, monkeypatch):
    """Each step starts from the one before; export ships the last model, its provenance nesting the
    step before and the asset it started from; a rerun skips every complete step."""
    assets = tmp_path / "assets"
    shutil.copytree(base_models.ASSETS_DIR / "tiny_gqa", assets / "tiny_gqa")
    monkeypatch.setattr(base_models, "ASSETS_DIR", assets)
    monkeypatch.setattr(quality, "QUALITY_NEEDLE", NeedleConfig(context_lengths=[1024], depths=[0.5], trials=1))
    before = json.loads((assets / "tiny_gqa" / "provenance.json").read_text())

    cfg, container = recipe(tmp_path, cache_dir, "export=true")
    first, second = run_pretrain(cfg, container, overrides=["recipe=toy"])
    assert first["config"]["start"]["init"] == "original"
    assert second["config"]["start"] == {"step": Path(first["model_dir"]).parent.name}
    assert second["metrics"]["train/tokens"] == 128 and second["metrics"]["val/ppl"] > 1

    after = json.loads((assets / "tiny_gqa" / "provenance.json").read_text())
    assert after["init"]["init"] == before
    assert after["tokens_seen"] == before["tokens_seen"] + 256
    assert after["command"] == "python src/pretrain.py recipe=toy"
    assert after["quality"]["val_ppl_fp32"] > 1 and after["quality"]["needle_grid"]["trials"] == 1
    assert (assets / "tiny_gqa" / "model.safetensors").read_bytes() == (
        Path(second["model_dir"]) / "model.safetensors"
    ).read_bytes()

    cfg, container = recipe(tmp_path, cache_dir)
    again = run_pretrain(cfg, container)
    assert [r["created"] for r in again] == [first["created"], second["created"]]


def test_a_changed_step_reruns_itself_and_every_later_step(tmp_path, cache_dir):
    cfg, container = recipe(tmp_path, cache_dir)
    first, second = run_pretrain(cfg, container)
    cfg, container = recipe(tmp_path, cache_dir, "steps.0.train.lr=5e-4")
    changed_first, changed_second = run_pretrain(cfg, container)
    assert changed_first["config_hash"] != first["config_hash"]
    assert changed_second["config_hash"] != second["config_hash"]  # it starts from another model


def test_bad_recipes_are_rejected_before_training(tmp_path, cache_dir):
    for override, named in (("steps.0.train.stages=[ntp]", "steps[0].train.stages"),
                            ("steps.1.train.seq_len=2048", "steps[1].train.seq_len=2048 exceeds the context"),
                            ("init=scratch model.arch=null", "model.arch")):
        cfg, container = recipe(tmp_path, cache_dir, *override.split())
        with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
            run_pretrain(cfg, container)
    assert not (tmp_path / "out" / "pretrain").exists()
