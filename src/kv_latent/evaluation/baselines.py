"""Results of an original model, computed once per (weights, settings) and shared by a sweep.

Every job of a sweep compares its student with the same original; the original's side of that
comparison (its evaluation suite, its val perplexity) depends only on its weights and the
settings of the measurement, so it is cached as JSON under a key of both and reused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from kv_latent import records
from kv_latent.files import cached_json

log = logging.getLogger(__name__)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's config and weights (each tensor's name, shape, dtype and float64
    sum: one pass, no copies), so a baseline is never reused for other weights."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{torch.sum(p, dtype=torch.float64).item():.10e}".encode())
    return h.hexdigest()[:16]


def _hashable(value: Any) -> Any:
    """``value`` with every tensor in it replaced by a hash of its dtype, shape and contents."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # (numel * itemsize,): any dtype
        return h.hexdigest()[:16]
    if isinstance(value, Mapping):
        return {k: _hashable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hashable(v) for v in value]
    return value


def cached_baseline(
    root: str | Path,
    kind: str,
    *,
    model: torch.nn.Module,
    settings: Mapping[str, Mapping[str, Any]],
    compute: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """``compute()`` of ``model``, cached in ``<root>/<kind>-<key>.json``.

    ``settings`` are the config sections the result depends on, as in a run's config (e.g.
    ``{"eval": {...}}`` or ``{"data": {"val_blocks": blocks}}``); a tensor among them counts by
    its contents. The key is :func:`kv_latent.records.config_hash` of them with
    ``{"model": {"fingerprint": ...}}``, so it changes with the weights and with any setting.
    ``kind`` names the file (what is cached, or whose).
    """
    unhashed = [s for s in settings if s == "model" or s not in records.HASHED_SECTIONS]
    if unhashed:
        raise ValueError(
            f"settings sections {unhashed} cannot enter the key: give config sections such as "
            f"{{'data': {{...}}}} or {{'eval': {{...}}}} (one of {records.HASHED_SECTIONS}, not 'model')"
        )
    key = records.config_hash({"model": {"fingerprint": model_fingerprint(model)}, **_hashable(settings)})
    path = Path(root) / f"{kind}-{key}.json"
    computed = False

    def run() -> dict[str, Any]:
        nonlocal computed
        computed = True
        return compute()

    result = cached_json(path, run)
    if not computed:
        log.info("original model: reusing %s", path)
    return result
