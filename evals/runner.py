"""The paired runner: baseline and intervened scores on identical items, in one process.

Each batch runs twice on the one loaded model, with the intervention toggled off then on, so the two
scores differ by the intervention alone. Per-sample results are appended to a JSONL log as batches
finish, so an interrupted run keeps what it computed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import scorers, stats


def evaluate(model, tokenizer, handle, tasks, *, samples_dir, split="test", limit=None, batch_size=16, seed=0):
    """`(results, timing)`: `results[task][metric]` with both scores, the paired delta, its bootstrap 95% CI,
    McNemar's p and n; `timing[task]` in seconds per item. Per-sample logs go to `samples_dir`."""
    results, timing = {}, {}
    with progress_bar() as progress:
        for task in tasks:
            items = task.items(split, limit)
            log = Path(samples_dir) / f"samples_{task.name}.jsonl"
            scored, seconds = _run_task(task, items, model, tokenizer, handle, batch_size, log, progress)
            results[task.name] = _metrics(task, scored, seed)
            timing[task.name] = {
                "items": len(items),
                "baseline_s_per_item": seconds["baseline"] / len(items),
                "intervened_s_per_item": seconds["intervened"] / len(items),
            }
    return results, timing


def _run_task(task, items, model, tokenizer, handle, batch_size, log, progress):
    order = sorted(range(len(items)), key=lambda i: -len(items[i].query))  # similar lengths share a batch
    scored = [None] * len(items)
    seconds = {"baseline": 0.0, "intervened": 0.0}
    bar = progress.add_task(task.name, total=len(items))
    with open(log, "w") as sink:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            both = {}
            for variant, enabled in (("baseline", False), ("intervened", True)):
                handle.enabled = enabled
                began = time.perf_counter()
                both[variant] = scorers.score(task, [items[i] for i in batch], model, tokenizer)
                seconds[variant] += time.perf_counter() - began
            for slot, i in enumerate(batch):
                scored[i] = {variant: both[variant][slot] for variant in both}
                sink.write(json.dumps({"task": task.name, "index": i, **_reference(items[i]), **scored[i]}) + "\n")
            sink.flush()
            progress.advance(bar, len(batch))
    handle.enabled = True
    return scored, seconds


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
