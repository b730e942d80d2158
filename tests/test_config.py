"""The typed config: bad input is rejected before any model loads, naming the key, with no record."""

import subprocess
import sys

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from conftest import ROOT, compose_config

from kv_latent import base_models
from kv_latent.config import ConfigError
from kv_latent.pipeline import run_job

SCHEMA_ERRORS = (HydraException, OmegaConfBaseException)  # raised while composing (types, keys, choices)

BAD_INPUTS = [
    # types, unknown keys and unknown choices: the schema, while composing
    ("kv.k_dim=abc", "kv.k_dim"),
    ("train.lr=fast", "train.lr"),
    ("train.tokens=lots", "train.tokens"),
    ("kv.kdim=32", "kdim"),
    ("+data.seqlen=8", "seqlen"),
    ("data.source=web", "data.source"),
    ("rope.schedule=bogus", "rope.schedule"),
    ("model=nosuch", "model"),
    ("train.stages=[intra,bogus]", "train.stages"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("logger.mode=sometimes", "logger.mode"),
    ("trainer.enable_progress_bar=maybe", "trainer.enable_progress_bar"),
    # a group's own ranges: its dataclass
    ("train.tokens=0", "train.tokens=0 must be positive"),
    ("train.pretrain_fraction=0.1", "exactly one of train.tokens and train.pretrain_fraction"),
    ("train.stages=[ntp,intra]", "train.stages"),
    ("trainer.devices=0", "trainer.devices=0"),
    ("model.num_key_value_heads=3", "model.num_key_value_heads=3 must divide"),
    ("eval.needle.depths=[1.5]", "eval.needle.depths"),
    ("data.recall_fraction=1.0", "data.recall_fraction"),
    # rules across groups: before any model loads
    ("train.seq_len=100000", "train.seq_len=100000 exceeds the context"),
    ("data.seq_len=16", "data.seq_len=16 must equal train.seq_len=256"),
    ("kv.k_dim=24", "kv.k_dim=24 must divide head_dim=64"),
    ("kv.v_dim=128", "kv.v_dim=128 must be in 1..64"),
    ("rope=freq_aware kv.k_dim=2", "kv.k_dim=2 must be a multiple of 4"),
    ("train.tokens=100", "less than one step"),
    ("train.stages=[pretrain]", "python src/pretrain.py"),
    ("trainer=gpu", "trainer.accelerator=gpu but no CUDA device"),
    ("trainer=ddp trainer.devices=3", "train.batch_size=8 must be divisible by trainer.devices=3"),
    ("eval.needle.context_lengths=[4096]", "eval.needle.context_lengths=[4096] exceed the model's context"),
    ("model=tiny_gqa model.path=nowhere", "embedded weights not found"),
    # the inits (DESIGN.md §2.6)
    ("kv.qk_init=bogus", "kv.qk_init"),
    ("kv.vo_init=svd", "kv.vo_init"),
    ("kv.calib_tokens=-1", "kv.calib_tokens=-1 must be >= 0"),
    ("kv.k_dim=32 kv.qk_init=freq_matched", "needs rope=freq_aware"),
    ("rope=freq_aware kv.qk_init=freq_matched", "kv.k_dim=64 does not suit kv.qk_init=freq_matched"),
    ("rope=freq_aware rope.at_full_dim=true kv.qk_init=freq_matched", "kv.k_dim=64 does not suit"),
    ("model.head_dim=96 rope=freq_aware kv.k_dim=32 kv.qk_init=freq_matched", "kv.k_dim=32 does not suit"),
    ("rope=freq_aware kv.k_dim=24 kv.qk_init=freq_matched", "kv.k_dim=24 does not suit"),
    ("rope=freq_aware kv.k_dim=32 kv.qk_init=qk_energy", "use rope=standard"),
    ("kv.k_dim=32 kv.qk_init=qk_energy kv.calib_tokens=0", "kv.qk_init=qk_energy need(s) calibration"),
    ("kv.v_dim=32 kv.vo_init=pca kv.calib_tokens=0", "kv.vo_init=pca need(s) calibration"),
    ("kv.vo_init=pca kv.v_dim=128", "kv.v_dim=128 must be in 1..64"),
    ("kv.vo_init=pca kv.calib_seq_len=2048", "kv.calib_seq_len=2048 exceeds the context"),
    # head compression (DESIGN.md §5)
    ("gqa=bogus", "gqa"),
    ("gqa.mode=bogus", "gqa.mode"),
    ("gqa=mean_pool", "gqa.mode=mean_pool needs gqa.kv_heads"),
    ("gqa=rope_pca gqa.kv_heads=0", "gqa.kv_heads=0 must be positive"),
    ("gqa=rope_pca gqa.kv_heads=-2", "gqa.kv_heads=-2 must be positive"),
    ("gqa=svd_w gqa.kv_heads=8", "gqa.kv_heads=8 must divide the KV heads"),
    ("gqa=svd_w gqa.kv_heads=3", "gqa.kv_heads=3 must divide the KV heads of model 'tiny_mha' "
                                 "(model.num_key_value_heads=4); allowed: [1, 2, 4]"),
    ("model=tiny_gqa gqa=mean_pool gqa.kv_heads=4", "gqa.kv_heads=4 must divide"),
    ("gqa.kv_heads=2", "gqa.kv_heads=2 is set but gqa.mode=keep"),
    ("gqa=svd_a gqa.kv_heads=2 gqa.calib_tokens=0", "gqa.mode=svd_a need(s) calibration"),
    ("gqa=rope_pca gqa.kv_heads=2 gqa.calib_tokens=0", "gqa.mode=rope_pca need(s) calibration"),
    ("gqa=rope_pca gqa.kv_heads=2 gqa.calib_seq_len=4096", "gqa.calib_seq_len=4096 exceeds the context"),
    ("gqa=svd_w gqa.kv_heads=2 gqa.query_aware=true", "gqa.query_aware=true weights rope_pca"),
    ("gqa=svd_a gqa.kv_heads=2 kv.k_dim=32", "gqa.mode=svd_a projects keys after RoPE"),
    ("gqa=svd_a gqa.kv_heads=2 kv.vo_init=pca", "gqa.mode=svd_a projects keys after RoPE"),
    ("gqa.calib_tokens=-5", "gqa.calib_tokens=-5 must be >= 0"),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(base_models, "load_base_model", refuse)


@pytest.mark.parametrize("override,named", BAD_INPUTS, ids=[o for o, _ in BAD_INPUTS])
def test_bad_input_is_rejected_before_any_model_loads(override, named, tmp_path, no_model_loads):
    if override == "trainer=gpu" and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is visible")
    overrides = [f"output_root={tmp_path}", "logger=none", *override.split()]
    with pytest.raises((ConfigError, *SCHEMA_ERRORS)) as err:
        cfg, container = compose_config("config", overrides)
        run_job(cfg, container)
    assert named in str(err.value)
    assert not list(tmp_path.rglob("record.json")) and not (tmp_path / "runs").exists()


def test_the_cli_reports_bad_input_in_one_line_without_a_traceback(tmp_path):
    for override, key, status in (("kv.k_dim=abc", "kv.k_dim", 1), ("train.seq_len=100000", "train.seq_len", 2)):
        out = subprocess.run([sys.executable, "src/run.py", override, f"output_root={tmp_path}", "logger=none"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        console = out.stdout + out.stderr  # Hydra's job log goes to stdout
        assert out.returncode == status, console
        assert key in console and "Traceback" not in console
    assert not (tmp_path / "runs").exists()


def test_defaults_live_in_the_schema_and_the_yaml_holds_what_differs():
    _, quick = compose_config("config", [])
    _, full = compose_config("config", ["eval=full"])
    assert quick["train"]["tokens"] == 393_216 and quick["data"]["seq_len"] == quick["train"]["seq_len"] == 256
    assert quick["eval"]["needle"]["context_lengths"] == [512] and full["eval"]["needle"]["trials"] == 8
    assert quick["kv"] == {"k_dim": 64, "v_dim": 64, "qk_init": "strided", "vo_init": "strided",
                           "calib_tokens": 16_384, "calib_seq_len": 256}
    assert quick["gqa"] == {"mode": "keep", "kv_heads": None, "query_aware": False, "calib_tokens": 16_384,
                            "calib_seq_len": 256}
    assert quick["logger"]["mode"] == "offline"


def test_a_pretrain_recipe_composes_into_typed_steps():
    cfg, container = compose_config("pretrain", ["recipe=copy_circuit", "model=tiny_gqa"])
    assert [s.name for s in cfg.steps] == ["copy_warmup", "copy_longctx", "copy_facts", "copy_extend"]
    assert all(s.train.pretraining and s.data.seq_len == s.train.seq_len for s in cfg.steps)
    assert container["steps"][3]["data"]["recall_fact_min_len"] == 128
    with pytest.raises(SCHEMA_ERRORS, match="Key 'bogus' not in 'TrainConfig'"):
        compose_config("pretrain", ["recipe=copy_circuit", "+steps.0.train.bogus=1"])
