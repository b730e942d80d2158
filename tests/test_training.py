"""Retraining: config rules, trainable sets, losses, every recipe at toy budget, exact resume, DDP."""

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

import kv_latent.training as training
from kv_latent.config import ConfigError
from kv_latent.data import StepBatches
from kv_latent.evaluation import perplexity
from kv_latent.surgery import build_student
from kv_latent.training import (
    CheckpointError,
    RetrainModule,
    TrainConfig,
    TrainerConfig,
    fit,
    kd_loss,
    lr_factor,
    ntp_loss,
    resolve_precision,
)

VOCAB, SEQ = 64, 32
CPU32 = TrainerConfig(accelerator="cpu", devices=1, precision="32-true", enable_progress_bar=False)


def tiny_teacher(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_student(teacher):
    return build_student(teacher, k_dim=4, v_dim=4)


def blocks(n: int = 24, seed: int = 1) -> torch.Tensor:
    # A learnable toy language: each block counts upwards mod VOCAB from a random start.
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(VOCAB, (n, 1), generator=g)
    return (starts + torch.arange(SEQ)) % VOCAB  # (n, SEQ)


def cfg(**overrides) -> TrainConfig:
    values = dict(
        stages=["ntp"], tokens=6 * 4 * SEQ, batch_size=4, seq_len=SEQ, lr=3e-3, warmup_ratio=0.0,
        lora_rank=4, lora_alpha=8, checkpoint_every=3, log_every=1,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"stages": ["ntp", "foo"]}, "train.stages"),
        ({"stages": []}, "train.stages"),
        ({"stages": ["pretrain", "ntp"]}, "train.stages"),
        ({"stages": ["ntp", "intra"]}, "train.stages"),
        ({"tokens": 0}, "train.tokens"),
        ({"tokens": -5}, "train.tokens"),
        ({"tokens": None}, "exactly one of train.tokens and train.pretrain_fraction"),
        ({"pretrain_fraction": 0.01}, "exactly one of train.tokens and train.pretrain_fraction"),
        ({"tokens": None, "pretrain_fraction": 0.0}, "train.pretrain_fraction"),
        ({"stages": ["intra", "ntp"], "intra_share": 1.0}, "train.intra_share"),
        ({"lr": 0.0}, "train.lr"),
        ({"seq_len": 1}, "train.seq_len"),
        ({"lora_rank": -1}, "train.lora_rank"),
        ({"kd_temperature": 0}, "train.kd_temperature"),
        ({"betas": [0.9]}, "train.betas"),
        ({"warmup_ratio": 1.0}, "train.warmup_ratio"),
        ({"init": "random"}, "train.init"),
        ({"init": "scratch"}, "train.init=scratch only applies to train.stages=[pretrain]"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        cfg(**overrides)


def test_budget_and_stage_schedule():
    c = cfg(stages=["intra", "ntp"], intra_share=0.25, tokens=None, pretrain_fraction=0.5)
    with pytest.raises(ConfigError, match="model.pretrain_tokens"):
        c.total_steps(None)
    assert c.total_steps(pretrain_tokens=40 * 128) == 20  # 2560 tokens / 128 per step
    assert [c.stage_at(s, 20) for s in range(20)] == ["intra"] * 5 + ["ntp"] * 15
    assert cfg(tokens=129).total_steps() == 2  # budgets round up to whole batches


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = [lr_factor(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[20] == pytest.approx(0.1)


def test_precision_auto():
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("auto", "cpu") in ("bf16-mixed", "32-true")
    with pytest.raises(ValueError, match="trainer.precision"):
        TrainerConfig(precision="fp8")


# ------------------------------------------------------------------ module


def test_trainable_sets():
    teacher = tiny_teacher()
    module = RetrainModule(tiny_student(teacher), teacher, cfg(), total_steps=6)
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    for name in trainable:
        assert any(f".{proj}." in name for proj in training.ATTENTION_PROJECTIONS) or "lora_" in name, name
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(any(f".{p}." in n for p in training.MLP_PROJECTIONS) for n in lora)
    assert sum(f".{p}.weight" in n for n in trainable for p in ("q_proj", "o_proj")) == 2 * 2
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in trainable)

    with_norms = RetrainModule(tiny_student(teacher), teacher, cfg(train_norms=True), total_steps=6)
    norms = {n for n, p in with_norms.student.named_parameters() if p.requires_grad and "norm" in n}
    assert len(norms) == 2 * 2 + 1  # two per layer + the final norm

    no_lora = RetrainModule(tiny_student(teacher), teacher, cfg(lora_rank=0), total_steps=6)
    assert not any(p.requires_grad for n, p in no_lora.student.named_parameters() if "mlp" in n)

    pretrain = RetrainModule(tiny_student(teacher), None, cfg(stages=["pretrain"]), total_steps=6)
    assert all(p.requires_grad for p in pretrain.student.parameters())


def test_teacher_is_not_a_submodule():
    teacher = tiny_teacher()
    module = RetrainModule(tiny_student(teacher), teacher, cfg(stages=["kd"]), total_steps=6)
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("_frozen") or "teacher" in k for k in module.state_dict())
    assert not teacher_params & {id(p) for p in module.parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    assert not teacher_params & {id(p) for g in optimizer.param_groups for p in g["params"]}
    with pytest.raises(ValueError, match="needs a teacher"):
        RetrainModule(tiny_student(teacher), None, cfg(stages=["intra"]), total_steps=6)


def test_kd_loss_zero_for_identical_models_and_blind_to_padding():
    torch.manual_seed(0)
    teacher_logits = torch.randn(2, 5, VOCAB)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    assert kd_loss(teacher_logits, teacher_logits, mask, temperature=2.0) == 0
    student_logits = torch.randn(2, 5, VOCAB)
    loss = kd_loss(student_logits, teacher_logits, mask, temperature=2.0)
    garbage = student_logits.clone()
    garbage[mask == 0] = torch.randn_like(garbage[mask == 0]) * 100
    garbage_teacher = teacher_logits.clone()
    garbage_teacher[mask == 0] = float("nan")
    assert kd_loss(garbage, garbage_teacher, mask, temperature=2.0) == loss
    # Token-averaged (not per-sequence) and scaled by T^2.
    s, t = student_logits[mask.bool()], teacher_logits[mask.bool()]  # (7, V)
    kl = (t.div(2).softmax(-1) * (t.div(2).log_softmax(-1) - s.div(2).log_softmax(-1))).sum(-1)
    torch.testing.assert_close(loss, kl.mean() * 4)


def test_kd_loss_of_student_equal_to_teacher_is_zero():
    teacher = tiny_teacher()
    module = RetrainModule(copy.deepcopy(teacher), teacher, cfg(stages=["kd"]), total_steps=6)
    batch = {"input_ids": blocks(4), "attention_mask": torch.ones(4, SEQ, dtype=torch.long)}
    assert module.stage_loss("kd", batch).item() == pytest.approx(0.0, abs=1e-6)
    assert module.stage_loss("intra", batch).item() == pytest.approx(0.0, abs=1e-10)


def test_ntp_loss_ignores_padding():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, VOCAB), torch.randint(VOCAB, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    loss = ntp_loss(logits, ids, mask)
    logits2, ids2 = logits.clone(), ids.clone()
    logits2[0, 3:] = 50.0  # position 3 predicts padding; positions 4, 5 are padding
    ids2[0, 4:] = 0
    assert ntp_loss(logits2, ids2, mask) == loss
    assert ntp_loss(logits, ids, None) != loss


@pytest.mark.parametrize("stage", ["intra", "ntp", "kd", "pretrain"])
def test_each_stage_loss_decreases_on_a_fixed_batch(stage):
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    # Strided init of a random tiny model is already close to it: give Stage I and KD work to do.
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".self_attn." in name:
                p.add_(torch.randn_like(p) * 0.2)
    c = cfg(stages=[stage], lr=1e-2)
    module = RetrainModule(student, None if stage == "pretrain" else teacher, c, total_steps=8)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = {"input_ids": blocks(4), "attention_mask": torch.ones(4, SEQ, dtype=torch.long)}
    losses = []
    for _ in range(8):
        loss = module.stage_loss(stage, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


# ------------------------------------------------------------------ fit


@pytest.mark.parametrize("stages", [["intra"], ["ntp"], ["kd"], ["intra", "ntp"], ["pretrain"]])
def test_fit_every_recipe(stages, tmp_path):
    teacher = tiny_teacher()
    before = params(teacher)
    student, metrics = fit(
        tiny_student(teacher),
        teacher=None if stages == ["pretrain"] else teacher,
        train_blocks=blocks(),
        val_blocks=blocks(4, seed=2),
        cfg=cfg(stages=stages),
        trainer_cfg=CPU32,
        run_dir=tmp_path,
    )
    assert metrics["train/steps"] == 6 and metrics["train/tokens"] == 6 * 4 * SEQ
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "val/loss", "val/ppl", "train/tokens_per_s"))
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert type(student).__name__ == "KVLatentForCausalLM"  # LoRA merged away
    assert not any("lora" in n for n in student.state_dict())
    ppl = perplexity(student, blocks(4, seed=2), batch_size=3)
    assert ppl["tokens"] == 4 * (SEQ - 1)
    assert ppl["loss"] == pytest.approx(metrics["val/loss"], rel=1e-4)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    for k, v in params(teacher).items():
        assert torch.equal(v, before[k]), k


def test_fit_bf16_auto_precision(tmp_path):
    teacher = tiny_teacher()
    trainer_cfg = TrainerConfig(accelerator="cpu", precision="auto", enable_progress_bar=False)
    _, metrics = fit(
        tiny_student(teacher), teacher=teacher, train_blocks=blocks(), cfg=cfg(stages=["intra", "kd"]),
        trainer_cfg=trainer_cfg, run_dir=tmp_path,
    )  # fmt: skip
    assert math.isfinite(metrics["train/loss"])


class Killed(Exception):
    pass


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    teacher = tiny_teacher()
    initial = tiny_student(teacher)
    c = cfg(stages=["intra", "ntp"], intra_share=0.3, tokens=8 * 4 * SEQ, warmup_ratio=0.25, checkpoint_every=3)
    run = dict(teacher=teacher, train_blocks=blocks(), cfg=c, trainer_cfg=CPU32)

    reference, _ = fit(copy.deepcopy(initial), run_dir=tmp_path / "full", **run)

    class DiesAtStep5(StepBatches):
        # Lightning prefetches one batch: dying on batch 5 leaves steps 0-3 done, last.ckpt at 3.
        def __iter__(self):
            for step, batch in enumerate(super().__iter__(), start=self.start_step):
                if step == 5:
                    raise Killed
                yield batch

    monkeypatch.setattr(training, "StepBatches", DiesAtStep5)
    with pytest.raises(Killed):
        fit(copy.deepcopy(initial), run_dir=tmp_path / "killed", **run)
    monkeypatch.setattr(training, "StepBatches", StepBatches)
    resumed, metrics = fit(copy.deepcopy(initial), run_dir=tmp_path / "killed", **run)

    assert metrics["train/resumed_from_step"] == 3 and metrics["train/steps"] == 8
    reference_params = params(reference)
    for k, v in params(resumed).items():
        torch.testing.assert_close(v, reference_params[k], rtol=0, atol=0, msg=k)


def test_corrupt_or_foreign_checkpoint_is_refused_before_training(tmp_path):
    teacher = tiny_teacher()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint")
    student = tiny_student(teacher)
    before = params(student)
    run = dict(teacher=teacher, train_blocks=blocks(), trainer_cfg=CPU32, run_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"last\.ckpt.*corrupt.*Delete it"):
        fit(student, cfg=cfg(), **run)
    assert all(torch.equal(v, before[k]) for k, v in params(student).items())

    last.unlink()
    fit(tiny_student(teacher), cfg=cfg(), **run)
    with pytest.raises(CheckpointError, match=r"different train settings \['lr'\]"):
        fit(tiny_student(teacher), cfg=cfg(lr=1e-4), **run)


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    teacher = tiny_teacher()
    initial = tiny_student(teacher)
    run = dict(teacher=teacher, train_blocks=blocks(), cfg=cfg(stages=["intra", "ntp"], tokens=4 * 4 * SEQ))
    single, _ = fit(copy.deepcopy(initial), trainer_cfg=CPU32, run_dir=tmp_path / "one", **run)
    ddp = TrainerConfig(accelerator="cpu", devices=2, strategy="ddp_spawn", precision="32-true", enable_progress_bar=False)
    double, metrics = fit(copy.deepcopy(initial), trainer_cfg=ddp, run_dir=tmp_path / "two", **run)
    assert metrics["train/steps"] == 4
    # Two ranks of batch 2 read the data of one rank of batch 4, and DDP averages their gradients.
    single_params = params(single)
    for k, v in params(double).items():
        torch.testing.assert_close(v, single_params[k], rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------ configs

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_group(group: str, option: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose(overrides=[f"+{group}={option}"])
    return OmegaConf.to_container(composed[group], resolve=True)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "train").glob("*.yaml")))
def test_every_train_config_composes_and_validates(option):
    c = TrainConfig(**compose_group("train", option))
    assert c.total_steps() >= 1
    if option == "default":
        assert c == TrainConfig()


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_every_trainer_config_composes(option):
    TrainerConfig(**compose_group("trainer", option))
