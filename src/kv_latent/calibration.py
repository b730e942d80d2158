"""Calibration: second moments of an original model's attention activations on train-split text
(DESIGN.md §2.6, §3).

The original runs over the first ``kv.calib_tokens`` tokens of the job's train split while forward
hooks read every layer's ``q_proj``, ``k_proj`` and ``v_proj`` outputs and the ``o_proj`` input.
For each head they accumulate the second moment ``E[x xᵀ]`` in float64 over the tokens the
attention mask keeps (pre-RoPE for queries and keys: the pair energies that matter are rotation
invariant). Data-aware inits read them through :class:`LayerMoments`. Head compression (DESIGN.md
§5) also needs moments *across* the KV heads of each group of ``group_size`` consecutive ones: of
the pre-RoPE keys, of the post-RoPE keys (the ``k_proj`` output rotated with the cos/sin the
attention receives) and of the values. The statistics are cached as safetensors, keyed by the
original's weights fingerprint and a hash of the blocks (which the calibration settings fix), so a
sweep computes them once per model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers.models.llama.modeling_llama import rotate_half

from kv_latent import records
from kv_latent.config import ConfigError, DataConfig
from kv_latent.data.blocks import load_blocks
from kv_latent.evaluation.baselines import model_fingerprint
from kv_latent.files import atomic_path

log = logging.getLogger(__name__)

STATS_VERSION = 1  # bump when what is accumulated changes: old caches are then not reused
KINDS = ("q", "k", "v", "o")  # q/k/v_proj outputs, o_proj input
GROUP_KINDS = ("k_group", "k_rope_group", "v_group")  # keys pre- and post-RoPE, values; per KV-head group


@dataclass(frozen=True)
class LayerMoments:
    """One layer's per-head second moments, float64 means over the calibration tokens.

    ``q``: (n_h, D, D), ``E[q_h q_hᵀ]`` per query head; ``k``, ``v``: (n_kv, D, D) per KV head;
    ``o``: (n_h, D, D) of the ``o_proj`` input (the attention output) per query head. Query head
    ``h`` belongs to KV head ``h // (n_h / n_kv)``, as in HF's ``repeat_kv``.

    With a ``group_size`` t (else None): ``k_group``, ``k_rope_group``, ``v_group``: (n_kv/t, tD, tD),
    ``E[x xᵀ]`` of the concatenated pre-RoPE keys, post-RoPE keys and values of each group of t
    consecutive KV heads (head ``b`` of a group in rows ``b·D:(b+1)·D``).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    k_group: torch.Tensor | None = None
    k_rope_group: torch.Tensor | None = None
    v_group: torch.Tensor | None = None

    @property
    def group_size(self) -> int | None:
        """KV heads per group of the group moments, or None without them."""
        return None if self.k_group is None else self.k_group.shape[-1] // self.k.shape[-1]

    def _by_group(self, per_query_head: torch.Tensor) -> torch.Tensor:
        n_kv = self.k.shape[0]
        return per_query_head.view(n_kv, -1, *per_query_head.shape[1:]).sum(dim=1)  # (n_kv, ...)

    @staticmethod
    def _pair_energy(moment: torch.Tensor) -> torch.Tensor:
        diag = moment.diagonal(dim1=-2, dim2=-1)  # (heads, D): E[x_c^2]
        half = diag.shape[-1] // 2
        return diag[:, :half] + diag[:, half:]  # (heads, D/2): E‖x_j‖² of rotate_half pair (j, j + D/2)

    def q_pair_energy(self) -> torch.Tensor:
        """``E‖q_j‖²`` per rotate_half pair, summed over each KV head's query heads: (n_kv, D/2)."""
        return self._by_group(self._pair_energy(self.q))

    def k_pair_energy(self) -> torch.Tensor:
        """``E‖k_j‖²`` per rotate_half pair of each KV head: (n_kv, D/2)."""
        return self._pair_energy(self.k)

    def o_group_moment(self) -> torch.Tensor:
        """``C_o = E[o oᵀ]`` summed over each KV head's query heads: (n_kv, D, D)."""
        return self._by_group(self.o)


@dataclass(frozen=True)
class CalibrationStats:
    """Per-layer :class:`LayerMoments` of one original model and the token count behind them."""

    layers: list[LayerMoments]
    tokens: int

    def layer(self, index: int) -> LayerMoments:
        return self.layers[index]

    @property
    def group_size(self) -> int | None:
        """KV heads per group of the group moments (the same in every layer), or None without them."""
        return self.layers[0].group_size

    def check_matches(self, config) -> None:
        """Raise ``ValueError`` unless these statistics fit a model of ``config``'s shape."""
        n_layers, n_h, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
        head_dim = config.head_dim
        shapes = {kind: (heads, head_dim, head_dim) for kind, heads in zip(KINDS, (n_h, n_kv, n_kv, n_h))}
        t = self.group_size
        if t is not None and n_kv % t == 0:
            shapes.update({kind: (n_kv // t, t * head_dim, t * head_dim) for kind in GROUP_KINDS})
        fits = len(self.layers) == n_layers and (t is None or n_kv % t == 0) and all(
            getattr(m, kind) is not None and getattr(m, kind).shape == shape
            for m in self.layers for kind, shape in shapes.items()
        )
        if not fits:
            raise ValueError(
                f"calibration statistics ({len(self.layers)} layers, q moments {tuple(self.layers[0].q.shape)}) do "
                f"not fit the model ({n_layers} layers, {n_h} heads, {n_kv} KV heads, head_dim {head_dim})"
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The moments by name, ``layers.<i>.<kind>``, as stored on disk (group moments if any)."""
        return {f"layers.{i}.{kind}": getattr(m, kind).contiguous()
                for i, m in enumerate(self.layers) for kind in KINDS + GROUP_KINDS if getattr(m, kind) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, tokens: int) -> CalibrationStats:
        n_layers = len({key.split(".")[1] for key in tensors})
        layers = [LayerMoments(**{kind: tensors[f"layers.{i}.{kind}"] for kind in KINDS + GROUP_KINDS
                                  if f"layers.{i}.{kind}" in tensors}) for i in range(n_layers)]
        return cls(layers=layers, tokens=tokens)


@torch.no_grad()
def second_moments(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    group_size: int | None = None,
) -> CalibrationStats:
    """Per-head second moments of ``model``'s attention activations over ``blocks``.

    ``blocks``: token ids (N, T); ``attention_mask``: (N, T), 1 for real tokens (default: all);
    ``group_size``: t, dividing n_kv, to also accumulate the group moments of :class:`LayerMoments`.
    Only the decoder runs (no LM head). Accumulation is float64 on the model's device (the CPU
    for MPS, which has no float64); the result lives on the CPU.
    """
    config = model.config
    n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.head_dim
    if group_size is not None and (group_size < 1 or n_kv % group_size):
        raise ValueError(f"group_size={group_size} must divide the model's {n_kv} KV heads")
    device = next(model.parameters()).device
    acc_device = torch.device("cpu") if device.type == "mps" else device
    # kind -> (blocks, width): the moment is (blocks, width, width), one block per head or group
    shapes = {kind: (heads, head_dim) for kind, heads in zip(KINDS, (n_h, n_kv, n_kv, n_h))}
    if group_size is not None:
        shapes.update({kind: (n_kv // group_size, group_size * head_dim) for kind in GROUP_KINDS})
    decoder = model.base_model
    sums = {(i, kind): torch.zeros(n, width, width, dtype=torch.float64, device=acc_device)
            for i in range(len(decoder.layers)) for kind, (n, width) in shapes.items()}
    # "keep": the current batch's mask, flattened (B * T,); "rope": (cos, sin) of the running attention
    batch: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

    def accumulate(i: int, kind: str, x: torch.Tensor) -> None:
        n, width = shapes[kind]
        x = x.reshape(-1, n, width)[batch["keep"]]  # (tokens, blocks, width): kept tokens only
        x = x.to(acc_device, torch.float64).transpose(0, 1)  # (blocks, tokens, width)
        sums[i, kind] += x.transpose(1, 2) @ x  # (blocks, width, width)

    def keep_rope(_module, _args, kwargs) -> None:
        if kwargs.get("position_embeddings") is None:
            raise ValueError("group moments need the cos/sin the attention receives (position_embeddings)")
        batch["rope"] = kwargs["position_embeddings"]

    def keys(i: int, k: torch.Tensor) -> None:
        accumulate(i, "k", k)
        if group_size is not None:
            accumulate(i, "k_group", k)
            k = k.to(acc_device, torch.float64).view(*k.shape[:2], n_kv, head_dim)  # (B, T, n_kv, D)
            cos, sin = (x.to(acc_device, torch.float64)[:, :, None] for x in batch["rope"])  # (B, T, 1, D)
            accumulate(i, "k_rope_group", k * cos + rotate_half(k) * sin)

    def values(i: int, v: torch.Tensor) -> None:
        accumulate(i, "v", v)
        if group_size is not None:
            accumulate(i, "v_group", v)

    hooks = []
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        if group_size is not None:
            hooks.append(attn.register_forward_pre_hook(keep_rope, with_kwargs=True))
        hooks.append(attn.q_proj.register_forward_hook(lambda _m, _args, out, i=i: accumulate(i, "q", out)))
        hooks.append(attn.k_proj.register_forward_hook(lambda _m, _args, out, i=i: keys(i, out)))
        hooks.append(attn.v_proj.register_forward_hook(lambda _m, _args, out, i=i: values(i, out)))
        hooks.append(attn.o_proj.register_forward_pre_hook(lambda _m, args, i=i: accumulate(i, "o", args[0])))
    mask = torch.ones_like(blocks) if attention_mask is None else attention_mask
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(blocks), batch_size), desc="calibration", unit="batch", disable=None):
            ids, batch_mask = (t[start : start + batch_size].to(device) for t in (blocks, mask))
            batch["keep"] = batch_mask.reshape(-1).bool()
            decoder(input_ids=ids, attention_mask=batch_mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    tokens = int(mask.sum())
    if tokens == 0:
        raise ValueError("calibration got no tokens: the attention mask keeps none")
    layers = [LayerMoments(**{kind: (sums[i, kind] / tokens).cpu() for kind in shapes})
              for i in range(len(decoder.layers))]
    return CalibrationStats(layers=layers, tokens=tokens)


def calibration_blocks(data: DataConfig, *, tokens: int, seq_len: int, tokenizer=None) -> torch.Tensor:
    """The first ``ceil(tokens / seq_len)`` blocks of ``seq_len`` tokens of the train split of
    ``data``'s source, without synthetic recall documents: ``LongTensor[N, seq_len]``."""
    n = math.ceil(tokens / seq_len)
    source = dataclasses.replace(data, seq_len=seq_len, max_blocks=n, recall_fraction=0.0, recall_fact_min_len=None)
    blocks = load_blocks(source, "train", tokenizer=tokenizer)
    if len(blocks) < n:
        raise ConfigError(
            f"kv.calib_tokens={tokens} needs {n} train blocks of kv.calib_seq_len={seq_len} tokens, but "
            f"data {data.name!r} has {len(blocks)}; lower kv.calib_tokens"
        )
    return blocks[:n]


def _tensor_hash(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # (numel * itemsize,): any dtype
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + data).hexdigest()[:16]


def cached_second_moments(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    cache_dir: str | Path,
    name: str,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    group_size: int | None = None,
) -> CalibrationStats:
    """:func:`second_moments`, cached in ``<cache_dir>/<name>-<key>.safetensors``.

    The key covers the weights fingerprint, :data:`STATS_VERSION`, hashes of the blocks and the
    mask, and ``group_size`` when set (files without group moments keep their keys), so other
    weights, other text or other groups never reuse a file; an unreadable file is recomputed.
    The file is written through a temporary file and a rename: readers see all of it or nothing.
    """
    kv = {"stats_version": STATS_VERSION}
    if group_size is not None:
        kv["group_size"] = group_size
    key = records.config_hash({
        "model": {"fingerprint": model_fingerprint(model)},
        "kv": kv,
        "data": {"blocks": _tensor_hash(blocks),
                 "mask": None if attention_mask is None else _tensor_hash(attention_mask)},
    })
    path = Path(cache_dir) / f"{name}-{key}.safetensors"
    if path.exists():
        try:
            stats = _load(path)
            log.info("calibration: reusing %s", path)
            return stats
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            log.warning("calibration: %s is unreadable (%s); computing it again", path, err)
    started = time.perf_counter()
    stats = second_moments(model, blocks, attention_mask=attention_mask, batch_size=batch_size, group_size=group_size)
    _save(path, stats)
    log.info("calibration: %d tokens in %.0f s -> %s", stats.tokens, time.perf_counter() - started, path)
    return stats


def _save(path: Path, stats: CalibrationStats) -> None:
    with atomic_path(path) as tmp:
        save_file(stats.tensors(), tmp, metadata={"tokens": str(stats.tokens), "version": str(STATS_VERSION)})


def _load(path: Path) -> CalibrationStats:
    with safe_open(path, framework="pt") as f:
        tokens = int(f.metadata()["tokens"])
    return CalibrationStats.from_tensors(load_file(path), tokens=tokens)


def calibrate(
    model: torch.nn.Module,
    *,
    data: DataConfig,
    tokens: int,
    seq_len: int,
    cache_dir: str | Path,
    name: str,
    tokenizer=None,
    batch_size: int = 8,
    group_size: int | None = None,
) -> CalibrationStats:
    """The statistics of ``model`` over :func:`calibration_blocks` of ``data``, cached
    (:func:`cached_second_moments`); what a job calls when one of its inits, or a calibrated head
    compression (``group_size`` = its KV heads per group), needs them."""
    blocks = calibration_blocks(data, tokens=tokens, seq_len=seq_len, tokenizer=tokenizer)
    return cached_second_moments(model, blocks, cache_dir=cache_dir, name=name, batch_size=batch_size,
                                 group_size=group_size)
