"""The paired runner: baseline and intervened scores on identical items, in one process.

Each batch runs twice on the one loaded model, with the intervention toggled off then on, so the two
scores differ by the intervention alone. Per-sample results are appended to a JSONL log as batches
finish, so an interrupted run keeps what it computed, and `resume=True` continues from that log: whole
batches already logged are read back, and the rest run as they would have (same order, same batches).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import scorers, stats
from .tasks import TaskError


def evaluate(
    model, tokenizer, handle, tasks, *, samples_dir, split="test", limit=None, batch_size=16, seed=0, resume=False
):
    """`(results, timing)`: `results[task][metric]` with both scores, the paired delta, its bootstrap 95% CI,
    McNemar's p and n; `timing[task]` in seconds per item scored in this run. Per-sample logs go to
    `samples_dir`; with `resume`, items already logged there are not scored again."""
    results, timing = {}, {}
    with progress_bar() as progress:
        for task in tasks:
            items = task.items(split, limit)
            log = Path(samples_dir) / f"samples_{task.name}.jsonl"
            scored, seconds, fresh = _run_task(task, items, model, tokenizer, handle, batch_size, log, progress, resume)
            results[task.name] = _metrics(task, scored, seed)
            timing[task.name] = {
                "items": len(items),
                "baseline_s_per_item": seconds["baseline"] / max(1, fresh),
                "intervened_s_per_item": seconds["intervened"] / max(1, fresh),
            }
    return results, timing


def _run_task(task, items, model, tokenizer, handle, batch_size, log, progress, resume):
    order = sorted(range(len(items)), key=lambda i: -len(items[i].query))  # similar lengths share a batch
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    scored = [None] * len(items)
    done = _logged_batches(log, task, items, batches) if resume else []
    seconds = {"baseline": 0.0, "intervened": 0.0}
    bar = progress.add_task(task.name, total=len(items))
    with open(log, "w") as sink:
        for batch, records in zip(batches, done, strict=False):  # rewritten whole: a line cut short is dropped
            for i, record in zip(batch, records, strict=True):
                scored[i] = {variant: record[variant] for variant in ("baseline", "intervened")}
                sink.write(json.dumps(record) + "\n")
            progress.advance(bar, len(batch))
        sink.flush()
        for batch in batches[len(done) :]:
            both = {}
            for variant, enabled in (("baseline", False), ("intervened", True)):
                handle.enabled = enabled
                began = time.perf_counter()
                try:
                    both[variant] = scorers.score(task, [items[i] for i in batch], model, tokenizer)
                except TaskError as error:
                    raise TaskError(f"task {task.name!r}, items {sorted(batch)}: {error}") from None
                seconds[variant] += time.perf_counter() - began
            for slot, i in enumerate(batch):
                scored[i] = {variant: both[variant][slot] for variant in both}
                sink.write(json.dumps({"task": task.name, "index": i, **_reference(items[i]), **scored[i]}) + "\n")
            sink.flush()
            progress.advance(bar, len(batch))
    handle.enabled = True
    return scored, seconds, len(items) - sum(map(len, done))


def _logged_batches(log: Path, task, items, batches) -> list[list[dict]]:
    """The records of the leading batches that an earlier run of this task logged in full."""
    if not log.exists():
        return []
    found = {}
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # the run was stopped while writing this line
        i = record.get("index")
        if record.get("task") != task.name or not isinstance(i, int) or not 0 <= i < len(items):
            raise ValueError(
                f"{log}:{number}: not a record of task {task.name!r} ({len(items)} items); start a new run"
            )
        if {k: record.get(k) for k in _reference(items[i])} != _reference(items[i]):
            raise ValueError(f"{log}:{number}: item {i} differs from the task's item {i}; start a new run")
        found[i] = record
    done = []
    for batch in batches:
        if not all(i in found for i in batch):
            break
        done.append([found[i] for i in batch])
    return done


def _metrics(task, scored, seed) -> dict:
    """Each metric on all items, before and after, with the paired bootstrap CI of the change; McNemar's p
    where the metric is a mean of per-item 0/1 outcomes (None elsewhere)."""
    kind = task.output_type
    fields, n = scorers.counts(kind), len(scored)
    counts = {v: np.array([[s[v][f] for f in fields] for s in scored], dtype=float) for v in ("baseline", "intervened")}
    totals = {v: scorers.corpus_metrics(kind, c.sum(axis=0), n) for v, c in counts.items()}
    binary = scorers.PAIRED_BINARY.get(kind, scorers.METRICS[kind])
    metrics = {}
    for name in scorers.METRICS[kind]:
        low, high = stats.paired_bootstrap_ci(
            counts["baseline"],
            counts["intervened"],
            statistic=lambda sums, n, name=name: scorers.corpus_metrics(kind, sums, n)[name],
            seed=seed,
        )
        before, after = float(totals["baseline"][name]), float(totals["intervened"][name])
        paired = [[s[v][name] for s in scored] for v in ("baseline", "intervened")] if name in binary else None
        metrics[name] = {
            "baseline": before,
            "intervened": after,
            "delta": after - before,
            "ci95": [low, high],
            "p_value": stats.mcnemar_p(*paired) if paired else None,
            "n": n,
        }
    return metrics


def _reference(item) -> dict:
    reference = {"query": item.query}
    if item.image is not None:
        reference["image"] = item.image
    if item.objects is not None:
        reference["objects"] = item.objects
    if item.answers is not None:
        reference["answers"] = item.answers
    elif item.choices is not None:
        reference |= {"choices": item.choices, "gold": item.gold}
    return reference


def progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
