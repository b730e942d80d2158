"""Evaluation of a (student or original) causal LM (DESIGN.md §2.4), one module per job.

- :mod:`~kv_latent.evaluation.perplexity`: token-weighted NLL on held-out token blocks (the quick
  check of training).
- :mod:`~kv_latent.evaluation.quality`: the quality bar of a shipped base model (val perplexity
  against a unigram baseline, in-context retrieval), recorded in its ``provenance.json``.
- :mod:`~kv_latent.evaluation.suite`: a job's full evaluation under the ``eval=`` group
  (:class:`~kv_latent.config.EvalConfig`, ``conf/eval/{quick,full,paper}.yaml``) for the student
  and its original, as flat metric keys for the record and W&B.
- :mod:`~kv_latent.evaluation.lm_eval_tasks`: the offline lm-eval suite (``kvl_*``, YAMLs in
  ``tasks/``) and lm-eval runs on an in-memory model.
- :mod:`~kv_latent.evaluation.needle`: the scored needle-in-a-haystack grid.
- :mod:`~kv_latent.evaluation.efficiency`: KV bytes (analytic, measured), TTFT, ms/token, peak
  memory.
- :mod:`~kv_latent.evaluation.decoding`: the greedy KV-cached decode loop that the needle grid and
  the latency protocol share.
- :mod:`~kv_latent.evaluation.baselines`: results of an original model cached per (weights,
  settings), so a sweep computes them once.
"""
