"""Retraining a reduced student (DESIGN.md §2.3).

Stages, run in the order of ``train.stages`` inside one fit:

- ``intra``: Stage I, intra-layer distillation. Every student layer gets the frozen teacher's input
  hidden state of that layer and learns to reproduce the teacher's output of that layer (MSE).
- ``ntp``: next-token prediction (cross-entropy).
- ``kd``: logit distillation, KL(teacher_T || student_T) · T².
- ``pretrain``: plain next-token prediction with every weight trainable and no teacher.

Modules: :mod:`~kv_latent.training.losses` (the losses, plain torch),
:mod:`~kv_latent.training.module` (trainable set, LR schedule, the LightningModule),
:mod:`~kv_latent.training.preemption` (SIGTERM / Ctrl-C: checkpoint at the step boundary) and
:mod:`~kv_latent.training.fit` (data, checkpoints, :func:`~kv_latent.training.fit.fit`).
This package imports nothing itself, so ``kv_latent.training.losses`` loads without Lightning.
"""
