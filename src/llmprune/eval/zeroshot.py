"""Zero-shot accuracy through stock lm-evaluation-harness, on the model already in memory.

``lm-eval`` is an optional extra (``pip install llmprune[eval]``). The pruning papers report the
seven tasks in :data:`PAPER_TASKS` (accuracy, and length-normalized accuracy where lm-eval
defines it); any other lm-eval task can be named, and task YAMLs of one's own are found with
``include_path`` (lm-eval's ``TaskManager(include_path=...)``).

Offline use. Stock tasks read their datasets from the Hub; without network access they fail, and
we say so before the model is loaded (tasks and their data are prepared first). The shipped task
``llmprune_wikitext2_cloze`` (``--tasks offline``) needs no network: a 4-way multiple-choice
next-word task built deterministically from the WikiText-2 *test* rows of the local data mirror
(:func:`cloze_items`). It is built from the test split, not validation, because our local mirror
has no WikiText-2 train split and calibration on ``wikitext2`` falls back to validation: a task
over validation could then score the model on its own calibration text. Test text is only ever
evaluated. The items are written once per source file into the llmprune cache as JSON lines and
handed to lm-eval as a ``dataset_path: json`` task, so they go through lm-eval's own
multiple-choice scoring (``acc`` and byte-length-normalized ``acc_norm``), not ours.

What is recorded (the report's ``zeroshot`` section): per task acc / acc_norm with their standard
errors, the number of scored documents and the task version; the mean over tasks; the settings
(num_fewshot, limit, batch size, seed); the lm-eval version; for the offline task, a hash of its
items file.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from ..errors import LLMPruneError
from ..recipe import comma_list
from ..report import versions

log = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OFFLINE_TASK = "llmprune_wikitext2_cloze"
OFFLINE_TASKS = (OFFLINE_TASK,)
ALIASES = {"paper": PAPER_TASKS, "offline": OFFLINE_TASKS}
CLOZE_VERSION = 1
CLOZE_ITEMS = 500
_INSTALL_HINT = "zero-shot evaluation needs lm-eval: pip install 'llmprune[eval]' (or pip install lm-eval)"


def parse_tasks(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Task names from a comma-separated string or a list; ``paper`` and ``offline`` expand."""
    if tasks is None:
        return list(PAPER_TASKS)
    out: list[str] = []
    for item in comma_list(tasks):
        for name in ALIASES.get(item, (item,)):
            if name not in out:
                out.append(name)
    if not out:
        raise LLMPruneError("no zero-shot task named; give --tasks paper, offline or lm-eval task names")
    return out


# --- the shipped offline task ------------------------------------------------------------------
_WORD = re.compile(r"^[a-z]{4,}$")


def _detok(text: str) -> str:
    """Undo WikiText's raw spacing around punctuation (``film , television`` -> ``film, television``)."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([,.;:!?)'])", r"\1", text)
    text = re.sub(r"([(]) ", r"\1", text)
    return re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)


def cloze_items(rows: list[str], n_items: int = CLOZE_ITEMS, seed: int = 0, n_choices: int = 4,
                context_words: int = 30) -> list[dict[str, Any]]:
    """Multiple-choice next-word items from WikiText rows (deterministic for ``seed``).

    Every sentence of at least 8 words that ends in a lowercase word of 4+ letters is a
    candidate: the context is the ``context_words`` words before that word, the answer is the
    word, and the distractors are other lowercase words of 4+ letters from the same paragraph
    (drawn by frequency). Distractors from the same paragraph are on topic, so the context must be
    understood, not only its subject recognized: SmolLM2-135M scores 0.81 on the 500 items, and
    0.38 after magnitude pruning to 50% (chance is 0.25). Longer contexts or distractors drawn from
    the whole text made the task too easy (0.94 dense) to show what pruning costs.
    """
    candidates: list[tuple[str, str, list[str]]] = []
    for row in rows:
        row = row.strip()
        if not row or row.startswith("="):
            continue
        words = row.split(" ")
        pool = [w for w in words if _WORD.match(w)]
        start = 0
        for i, word in enumerate(words):
            if word != ".":
                continue
            sentence = words[start:i]
            if len(sentence) >= 8 and _WORD.match(sentence[-1]) and len(set(pool) - {sentence[-1]}) >= n_choices - 1:
                context = words[max(0, i - 1 - context_words):i - 1]
                candidates.append((_detok(" ".join(context)), sentence[-1], pool))
            start = i + 1
    if len(candidates) < 1:
        raise LLMPruneError(f"too little text to build a {n_choices}-way cloze task (no candidate sentence)")
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(candidates)), min(n_items, len(candidates))))
    items = []
    for index in picked:
        context, answer, pool = candidates[index]
        choices = {answer}
        while len(choices) < n_choices:
            choices.add(rng.choice(pool))
        ordered = sorted(choices)
        rng.shuffle(ordered)
        items.append({"context": context, "choices": ordered, "label": ordered.index(answer)})
    return items


def offline_task_config(data_dir: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The lm-eval config of the shipped cloze task (items file built on first use) and its provenance."""
    from ..data.sources import read_documents, resolve
    from ..models.loading import cache_root

    source = resolve("wikitext2:test", "evaluation", data_dir)
    rows = read_documents(source)
    digest = hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()[:16]
    folder = cache_root() / "tasks" / f"{OFFLINE_TASK}-v{CLOZE_VERSION}-{digest}"
    path = folder / "test.jsonl"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        items = cloze_items(rows)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".test.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(item) + "\n" for item in items)
        from ..io.save import follow_umask

        follow_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    items_sha = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    config = {
        "task": OFFLINE_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": float(CLOZE_VERSION)},
    }
    provenance = {**source.describe(), "items_file": str(path), "items_sha256": items_sha,
                  "items": sum(1 for _ in path.open(encoding="utf-8"))}
    return config, provenance


# --- preparing tasks (before any model is loaded) -----------------------------------------------
@dataclass
class PreparedTasks:
    """lm-eval Task objects with their data loaded, ready to run on any model."""

    names: list[str]
    tasks: list[Any]
    task_manager: Any
    provenance: dict[str, Any] = field(default_factory=dict)


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise LLMPruneError(_INSTALL_HINT) from None
    # lm-eval warns per request (left truncation) and about in-memory models; our report says what matters.
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval


def prepare_tasks(tasks: str | list[str] | None, *, data_dir: str | None = None,
                  include_path: str | None = None) -> PreparedTasks:
    """Check task names and load their data; unknown names and unreachable data fail here, clearly."""
    names = parse_tasks(tasks)
    _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise LLMPruneError(f"--include-path {include_path} is not a folder of lm-eval task YAML files")
    others = [n for n in names if n not in OFFLINE_TASKS]
    # The full index of lm-eval's ~10k stock task files takes seconds (about 13 s on 2 cores); skip it
    # when only ours are asked, and build the stock index once per process (a sweep evaluates many times).
    manager = _task_manager(include_path, False) if include_path else None
    if others and (manager is None or any(n not in manager.all_tasks for n in others)):
        manager = _task_manager(include_path, True)
    if manager is None:
        manager = _task_manager(None, False)
    known = set(manager.all_tasks) if others else set()
    unknown = [n for n in others if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise LLMPruneError(f"unknown lm-eval task {', '.join(hints)}; use `paper` (the seven paper tasks), "
                            f"`offline` ({OFFLINE_TASK}), an lm-eval task name, or --include-path for your own YAMLs")
    specs: list[Any] = []
    provenance: dict[str, Any] = {}
    for name in names:
        if name == OFFLINE_TASK:
            config, provenance[name] = offline_task_config(data_dir)
            specs.append(config)
        else:
            specs.append(name)
    loaded: dict[str, Any] = {}
    for name, spec in zip(names, specs, strict=True):
        try:
            with _quiet():
                loaded.update(manager.load([spec])["tasks"])
        except Exception as exc:  # dataset loading raises many types (ConnectionError, FileNotFoundError, ...)
            raise LLMPruneError(
                f"task {name}: could not load its data ({type(exc).__name__}: {str(exc)[:300]}). Stock lm-eval "
                f"tasks download their datasets from the Hub; without network access use --tasks offline, or "
                f"--include-path with task YAMLs whose dataset_path points at local files"
            ) from None
    return PreparedTasks(names, list(loaded.values()), manager, provenance)


def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """lm-eval's index of task files. Only the stock index is kept for the process: a user's own
    folder may gain task files between calls."""
    if include_path is None:
        return _stock_task_manager(include_defaults)
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


@functools.lru_cache(maxsize=2)
def _stock_task_manager(include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the datasets library's per-split progress bars and retries while tasks load."""
    import datasets

    previous = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(previous)


# --- running ---------------------------------------------------------------------------------------
def _metric(values: dict[str, Any], name: str) -> float | None:
    value = values.get(f"{name},none")
    if isinstance(value, (int, float)) and value == value:  # not NaN
        return float(value)
    return None


def run_zeroshot(model: Any, tokenizer: Any, prepared: PreparedTasks, *, num_fewshot: int = 0,
                 limit: int | None = None, batch_size: int | str = 8, seed: int = 0,
                 device: torch.device | None = None) -> dict[str, Any]:
    """Evaluate ``prepared`` tasks on the in-memory model with lm-eval; the report's ``zeroshot`` section."""
    if num_fewshot < 0:
        raise LLMPruneError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise LLMPruneError(f"--limit must be at least 1 document per task, got {limit}")
    lm_eval = _lm_eval()
    from .chunked_lm import make_lm

    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        lm = make_lm(model, tokenizer, batch_size)  # HFLM, log-likelihoods through the chunked head
        # lm-eval records the git hash of the working directory by running git (noise on stderr
        # outside a repository, and not a fact about the model): our report records versions instead.
        with mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None):
            results = lm_eval.simple_evaluate(
                model=lm, tasks=prepared.tasks, task_manager=prepared.task_manager, num_fewshot=num_fewshot,
                limit=limit, bootstrap_iters=1000, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
    finally:
        model.train(was_training)
    if results is None:  # a non-zero rank of a distributed run
        return {}
    tasks: dict[str, Any] = {}
    for name, values in results["results"].items():
        if name not in {t.task_name for t in prepared.tasks}:
            continue  # group aggregates
        extra = {k.split(",")[0]: v for k, v in values.items()
                 if "," in k and isinstance(v, (int, float)) and not k.split(",")[0].endswith("_stderr")}
        tasks[name] = {
            "acc": _metric(values, "acc"), "acc_stderr": _metric(values, "acc_stderr"),
            "acc_norm": _metric(values, "acc_norm"), "acc_norm_stderr": _metric(values, "acc_norm_stderr"),
            "samples": int(results.get("n-samples", {}).get(name, {}).get("effective", 0)),
            "version": str(results.get("versions", {}).get(name, "")),
            **({"metrics": extra} if set(extra) - {"acc", "acc_norm"} else {}),
            **({"data": prepared.provenance[name]} if name in prepared.provenance else {}),
        }
    accs = [t["acc"] for t in tasks.values() if t["acc"] is not None]
    norms = [t["acc_norm"] for t in tasks.values() if t["acc_norm"] is not None]
    return {
        "tasks": tasks,
        "mean": {"acc": sum(accs) / len(accs) if accs else None,
                 "acc_norm": sum(norms) / len(norms) if norms else None,
                 "tasks": len(tasks)},
        "settings": {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size, "seed": seed},
        "versions": {"lm_eval": str(results.get("lm_eval_version") or versions().get("lm_eval", "unknown"))},
        "seconds": round(time.perf_counter() - t0, 3),
    }
