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
    metrics = {}
    for name in scorers.METRICS[task.output_type]:
        baseline = np.array([s["baseline"][name] for s in scored])
        intervened = np.array([s["intervened"][name] for s in scored])
        low, high = stats.paired_bootstrap_ci(baseline, intervened, seed=seed)
        metrics[name] = {
            "baseline": float(baseline.mean()),
            "intervened": float(intervened.mean()),
            "delta": float(intervened.mean() - baseline.mean()),
            "ci95": [low, high],
            "p_value": stats.mcnemar_p(baseline, intervened),
            "n": len(scored),
        }
    return metrics


def _reference(item) -> dict:
    if item.answers is not None:
        return {"query": item.query, "answers": item.answers}
    return {"query": item.query, "choices": item.choices, "gold": item.gold}


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
