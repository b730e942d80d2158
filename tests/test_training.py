"""Retraining: config rules, trainable sets, losses, every recipe at toy budget, exact resume
after a crash or a signal (in process, and SIGTERM to a real process), DDP."""

import copy
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kv_latent.training.fit as fit_module
from kv_latent.config import Accelerator, ConfigError, Precision, TrainConfig, TrainerConfig
from kv_latent.data.batches import StepBatches
from kv_latent.surgery import build_student
from kv_latent.training.fit import CheckpointError, fit, resolve_precision
from kv_latent.training.losses import kd_loss, ntp_loss
from kv_latent.training.module import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, RetrainModule, lr_factor
from kv_latent.training.preemption import TrainingInterrupted

VOCAB, SEQ = 64, 32
# Enum members, as the composed config holds them.
CPU32 = TrainerConfig(accelerator=Accelerator.cpu, devices=1, precision=Precision("32-true"), enable_progress_bar=False)


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


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for k, v in actual.items():
        assert torch.equal(v, expected[k]), k


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"stages": ["kd", "ntp"]}, "train.stages"),
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
        ({"warmup_ratio": 1.0}, "train.warmup_ratio"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
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


# ------------------------------------------------------------------ module


def test_trainable_sets():
    teacher = tiny_teacher()
    module = RetrainModule(tiny_student(teacher), teacher, cfg(), total_steps=6)
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    for name in trainable:
        assert any(f".{proj}." in name for proj in ATTENTION_PROJECTIONS) or "lora_" in name, name
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(any(f".{p}." in n for p in MLP_PROJECTIONS) for n in lora)
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
        cfg=cfg(stages=stages),
        trainer_cfg=CPU32,
        run_dir=tmp_path,
    )
    assert metrics["train/steps"] == 6 and metrics["train/tokens"] == 6 * 4 * SEQ
    assert metrics["train/resumed_from_step"] == 0
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "train/lr", "train/tokens_per_s"))
    assert all(k.startswith("train/") for k in metrics)  # validation is the caller's (fp32 perplexity)
    assert type(student).__name__ == "KVLatentForCausalLM"  # LoRA merged away
    assert not any("lora" in n for n in student.state_dict())
    assert not student.training and not any(p.requires_grad for p in student.parameters())
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


# What fit used to print, none of which a user can act on (the first two are raised by peft and
# by Lightning's pytree helper, the last by peft when it merges LoRA into a tied-embedding model).
SILENCED = ("`is_gradient_checkpointing` is deprecated", "`isinstance(treespec, LeafSpec)` is deprecated",
            "`IterableDataset` has `__len__` defined", "Input and output embeddings are no longer tied")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_fit_says_one_line_and_hides_notes_no_user_can_act_on(tmp_path, caplog):
    teacher = tiny_teacher()
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    lightning = Records()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).addHandler(lightning)
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="kv_latent"):
            warnings.simplefilter("always")
            student, _ = fit(tiny_student(teacher), teacher=teacher, train_blocks=blocks(), cfg=cfg(),
                             trainer_cfg=CPU32, run_dir=tmp_path / "tiny" / "run")
    finally:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).removeHandler(lightning)
    ours = [r.getMessage() for r in caplog.records if r.name == "kv_latent.training.fit"]
    assert ours == ["training tiny/run on cpu, 32-true, 6 steps of 4x32 tokens"]
    notes = [r.getMessage() for r in lightning.records if r.name in fit_module.LIGHTNING_NOTES]
    assert notes == []  # "GPU available", "`Trainer.fit` stopped", the litlogger tip, ...
    assert not [str(w.message) for w in caught if str(w.message).startswith(SILENCED)]
    assert student.lm_head.weight is student.model.embed_tokens.weight  # re-tied after the merge
    for name in fit_module.LIGHTNING_NOTES:
        assert logging.getLogger(name).level == logging.NOTSET  # restored


RESUME_STEPS = 8


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory):
    """A two-stage recipe whose LR changes at every step, checkpointed every 3 steps, and the
    weights of its uninterrupted run."""
    teacher = tiny_teacher()
    initial = tiny_student(teacher)
    c = cfg(stages=["intra", "ntp"], intra_share=0.3, tokens=RESUME_STEPS * 4 * SEQ, warmup_ratio=0.25)
    run = dict(teacher=teacher, train_blocks=blocks(), cfg=c, trainer_cfg=CPU32)
    reference, _ = fit(copy.deepcopy(initial), run_dir=tmp_path_factory.mktemp("uninterrupted"), **run)
    return initial, run, params(reference)


class Killed(Exception):
    pass


def test_killed_and_resumed_run_matches_uninterrupted(resume_case, tmp_path, monkeypatch):
    initial, run, reference = resume_case

    class DiesAtStep5(StepBatches):
        # Dying while batch 5 is fetched (at the start of step 5) leaves steps 0-4 done, last.ckpt at 3.
        def __iter__(self):
            for step, batch in enumerate(super().__iter__(), start=self.start_step):
                if step == 5:
                    raise Killed
                yield batch

    monkeypatch.setattr(fit_module, "StepBatches", DiesAtStep5)
    with pytest.raises(Killed):
        fit(copy.deepcopy(initial), run_dir=tmp_path, **run)
    monkeypatch.setattr(fit_module, "StepBatches", StepBatches)
    resumed, metrics = fit(copy.deepcopy(initial), run_dir=tmp_path, **run)

    assert metrics["train/resumed_from_step"] == 3 and metrics["train/steps"] == RESUME_STEPS
    assert_same_weights(params(resumed), reference)


def signal_when_fetching(signum: int, step: int) -> type[StepBatches]:
    class SignalledBatches(StepBatches):
        def __iter__(self):
            for i, batch in enumerate(super().__iter__(), start=self.start_step):
                if i == step:
                    os.kill(os.getpid(), signum)
                yield batch

    return SignalledBatches


def signal_in_setup(monkeypatch, signum: int) -> None:
    # configure_optimizers runs while the Trainer sets up, before Lightning's handler is installed.
    configure = RetrainModule.configure_optimizers

    def configure_then_signal(self):
        os.kill(os.getpid(), signum)
        return configure(self)

    monkeypatch.setattr(RetrainModule, "configure_optimizers", configure_then_signal)


@pytest.mark.parametrize(
    "signum, when, stop_step",
    [
        # A signal while batch 4 is fetched arrives at the start of step 4, which finishes; last.ckpt
        # is then at 5, between the periodic checkpoints at 3 and 6.
        pytest.param(signal.SIGTERM, 4, 5, id="sigterm"),
        pytest.param(signal.SIGINT, 4, 5, id="sigint"),
        # In the last step: training is complete, yet the job was told to stop; the relaunch has
        # nothing left to train and returns the same weights.
        pytest.param(signal.SIGTERM, RESUME_STEPS - 1, RESUME_STEPS, id="sigterm-in-last-step"),
        # Before the loop: held until training starts, then one step is done and written.
        pytest.param(signal.SIGTERM, "setup", 1, id="sigterm-in-setup"),
    ],
)
def test_signal_checkpoints_at_the_step_boundary_and_resume_is_exact(
    resume_case, tmp_path, monkeypatch, signum, when, stop_step
):
    initial, run, reference = resume_case
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    if when == "setup":
        signal_in_setup(monkeypatch, signum)
    else:
        monkeypatch.setattr(fit_module, "StepBatches", signal_when_fetching(signum, when))

    with pytest.raises(TrainingInterrupted) as stopped:
        fit(copy.deepcopy(initial), run_dir=tmp_path, **run)
    last = tmp_path / "checkpoints" / "last.ckpt"
    name = signal.Signals(signum).name
    expected = f"training stopped by {name} at step {stop_step} of {RESUME_STEPS}; rerun to resume from {last}"
    assert str(stopped.value) == expected
    assert stopped.value.checkpoint == last and stopped.value.signum == signum
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == stop_step
    # The scheduler has stepped once per optimiser step and Adam counts the same steps.
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == stop_step
    assert {int(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()} == {stop_step}

    monkeypatch.undo()
    resumed, metrics = fit(copy.deepcopy(initial), run_dir=tmp_path, **run)
    assert metrics["train/resumed_from_step"] == stop_step and metrics["train/steps"] == RESUME_STEPS
    assert_same_weights(params(resumed), reference)
    assert {s: signal.getsignal(s) for s in handlers} == handlers


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


# ------------------------------------------------------------------ SIGTERM to a real process

SIGTERM_STEPS = 40
TRAIN_SCRIPT = f"""
import json, sys, time
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger

sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_training import CPU32, SEQ, blocks, cfg, tiny_student, tiny_teacher

from kv_latent.training.fit import fit

run_dir = Path(sys.argv[1])


class StepFile(Logger):
    # Writes each logged step to run_dir/step for the test to poll, and slows the steps down so
    # that the SIGTERM lands mid-run; neither changes what is trained.
    name, version = "step_file", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step):
        (run_dir / "step").write_text(str(step))
        time.sleep(0.1)


torch.set_num_threads(1)
teacher = tiny_teacher()
student, metrics = fit(
    tiny_student(teacher),
    teacher=teacher,
    train_blocks=blocks(),
    # checkpoint_every past the budget: only SIGTERM and the end of training write last.ckpt.
    cfg=cfg(stages=["intra", "ntp"], tokens={SIGTERM_STEPS} * 4 * SEQ, warmup_ratio=0.25, checkpoint_every=1000),
    trainer_cfg=CPU32,
    run_dir=run_dir,
    loggers=[StepFile()],
)
torch.save(student.state_dict(), run_dir / "final.pt")
print(json.dumps(metrics))
"""


def launch(script: Path, run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_sigterm_to_a_training_process_then_relaunch_matches_uninterrupted(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    uninterrupted = launch(script, tmp_path / "uninterrupted")
    run_dir = tmp_path / "preempted"
    preempted = launch(script, run_dir)
    deadline = time.monotonic() + 240
    while not ((run_dir / "step").exists() and int((run_dir / "step").read_text() or 0) >= 5):
        assert preempted.poll() is None, f"ended before the SIGTERM: {finish(preempted)}"
        assert time.monotonic() < deadline, "no step logged in time"
        time.sleep(0.05)
    preempted.send_signal(signal.SIGTERM)
    code, _, err = finish(preempted)

    last = run_dir / "checkpoints" / "last.ckpt"
    assert code != 0
    assert "TrainingInterrupted: training stopped by SIGTERM at step" in err and str(last) in err
    stop_step = torch.load(last, weights_only=False)["global_step"]
    assert 5 <= stop_step < SIGTERM_STEPS
    assert not (run_dir / "final.pt").exists()

    code, out, err = finish(launch(script, run_dir))
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["train/resumed_from_step"] == stop_step and metrics["train/steps"] == SIGTERM_STEPS
    code, _, err = finish(uninterrupted)
    assert code == 0, err
    assert_same_weights(torch.load(run_dir / "final.pt"), torch.load(tmp_path / "uninterrupted" / "final.pt"))
