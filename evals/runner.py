"""The paired runner: baseline and intervened scores on identical items, in one process or several.

Each batch runs twice on the one loaded model, with the intervention toggled off then on, so the two
scores differ by the intervention alone. Per-sample results are appended to a JSONL log as batches
finish (and each batch's seconds to `timing_<task>.jsonl`), so an interrupted run keeps what it computed, and
`resume=True` continues from the logs: the batches whose items are all logged are read back, and the rest run
as they would have (same batches).

Started as W processes by `accelerate launch` (or torchrun), the runner shares out the batches. They
are formed as in one process (same order, same size), so each batch computes the same whatever W; rank
r scores the batches r, r+W, r+2W, ... of those not yet done and logs them to its own
`samples_<task>.rank<r>.jsonl`. At the end of a task rank 0 gathers every record, writes
`samples_<task>.jsonl` in batch order (the file one process writes) and computes the metrics.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

from . import scorers, stats
from .report import write_atomic
from .tasks import TaskError


def processes(device: str | None = None):
    """The processes of this run (accelerate's `PartialState`): one, or those that `accelerate launch` or
    torchrun started; later `PartialState()` calls return this same state."""
    # accelerate treats processes without a GPU as distributed (over gloo) only when told they run on CPU
    on_cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    return PartialState(cpu=on_cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


def evaluate(
    model, tokenizer, handle, tasks, *, samples_dir, split="test", limit=None, batch_size=16, seed=0, seeds=1,
    resume=False,
):  # fmt: skip
    """`(results, timing)`: `results[task][metric]` with both scores, the paired delta, its bootstrap 95% CI,
    McNemar's p and n; `timing[task]` in seconds per item, summed over the processes (process-seconds per
    item: W processes take about 1/W of it in wall time) and over the runs that a resumed run continues.
    A task that samples runs `seeds` times, with the seeds `seed`, `seed + 1`, ... (`_metrics` pools them).
    Per-sample logs go to `samples_dir`; with `resume`, items already logged there are not scored again.
    In a run of several processes each one calls this; rank 0 gets the results, the others `({}, {})`."""
    main = PartialState().is_main_process  # as `processes` set it up; one process if nothing did
    results, timing = {}, {}
    with progress_bar(disable=not main) as progress:
        for task in tasks:
            items = task.items(split, limit)
            drawn = [seed + k for k in range(seeds)] if task.samples else [seed]
            runs, seconds, timed = [], {"baseline": 0.0, "intervened": 0.0}, 0
            for run_seed in drawn:
                name = task.name if len(drawn) == 1 else f"{task.name}.seed{run_seed}"
                log = Path(samples_dir) / f"samples_{name}.jsonl"
                scored, spent, count = _run_task(
                    task, items, model, tokenizer, handle, batch_size, log, progress, resume, run_seed
                )
                if main:
                    runs.append(scored)
                    seconds = {variant: seconds[variant] + spent[variant] for variant in seconds}
                    timed += count
            if main:
                results[task.name] = _metrics(task, runs, seed, drawn)
                timing[task.name] = {
                    "items": len(items),
                    "baseline_s_per_item": seconds["baseline"] / max(1, timed),
                    "intervened_s_per_item": seconds["intervened"] / max(1, timed),
                }
    return results, timing


def _run_task(task, items, model, tokenizer, handle, batch_size, log, progress, resume, seed):
    """`(scored, seconds, timed)` on rank 0: both results of every item, the seconds each variant took on all
    ranks together, and the number of items those seconds are for (every item, counting the runs a resumed one
    continues); `(None, None, None)` on the other ranks. A task that samples draws each batch, in both passes,
    from torch's generator seeded `scorers.batch_seed(seed, batch number)`."""
    ranks = PartialState()
    order = sorted(range(len(items)), key=lambda i: -len(items[i].query))  # similar lengths share a batch
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    done = _logged_batches(log, task, items, batches) if resume else {}  # {batch number: its records}
    # each batch's seconds go to timing_<task>.jsonl, apart from the samples (whose bytes must not vary)
    clock = log.with_name(log.name.replace("samples_", "timing_", 1))
    timed = {n: entry for n, entry in _logged_seconds(clock).items() if n in done} if resume else {}
    ranks.wait_for_everyone()  # every rank has read the logs before rank 0 rewrites them
    if ranks.is_main_process:
        _rewrite_log(log, done)  # complete batches only: a line cut short by a kill is dropped
        _rewrite_log(clock, timed)
    ranks.wait_for_everyone()

    todo = [number for number in range(len(batches)) if number not in done]
    mine = todo[ranks.process_index :: ranks.num_processes]
    rank = "" if ranks.num_processes == 1 else f".rank{ranks.process_index}"  # each rank logs to its own files
    live, live_clock = (path.with_name(f"{path.stem}{rank}.jsonl") for path in (log, clock))
    scored_here, timed_here = {}, {}
    already = sum(map(len, done.values()))
    bar = progress.add_task(
        log.stem.removeprefix("samples_"), total=already + sum(len(batches[number]) for number in mine)
    )  # rank 0's share
    progress.advance(bar, already)
    with open(live, "a") as sink, open(live_clock, "a") as clock_sink:
        for number in mine:
            batch, both, spent = batches[number], {}, {"batch": number}
            for variant, enabled in (("baseline", False), ("intervened", True)):
                handle.enabled = enabled
                torch.manual_seed(scorers.batch_seed(seed, number))
                began = time.perf_counter()
                try:
                    both[variant] = scorers.score(task, [items[i] for i in batch], model, tokenizer)
                except TaskError as error:
                    raise TaskError(f"task {task.name!r}, items {sorted(batch)}: {error}") from None
                spent[variant] = time.perf_counter() - began
            scored_here[number] = [
                {"task": task.name, "index": i, **_reference(items[i]), **{v: both[v][slot] for v in both}}
                for slot, i in enumerate(batch)
            ]
            timed_here[number] = [spent]
            sink.write(_lines(scored_here[number]))
            sink.flush()
            clock_sink.write(_lines(timed_here[number]))  # after the samples: a batch timed is a batch logged
            clock_sink.flush()
            progress.advance(bar, len(batch))
    handle.enabled = True

    shares = gather_object([(scored_here, timed_here)])  # each rank's (records, seconds), on every rank
    if not ranks.is_main_process:
        return None, None, None
    for records, spent in shares:
        done |= records
        timed |= spent
    _rewrite_log(log, done)  # every batch, in batch order: the file one process writes
    _rewrite_log(clock, timed)
    scored = [None] * len(items)
    for record in (record for records in done.values() for record in records):
        scored[record["index"]] = {variant: record[variant] for variant in ("baseline", "intervened")}
    seconds = {variant: sum(entry[variant] for (entry,) in timed.values()) for variant in ("baseline", "intervened")}
    return scored, seconds, sum(len(batches[number]) for number in timed)


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def _rank_logs(log: Path) -> list[Path]:
    """The logs that the ranks of a run of several processes keep beside `samples_<task>.jsonl`."""
    name = re.compile(re.escape(log.stem) + r"\.rank\d+\.jsonl")
    return sorted(path for path in log.parent.iterdir() if name.fullmatch(path.name))


def _rewrite_log(log: Path, done: dict[int, list[dict]]) -> None:
    """Make `log` hold the records of the batches in `done` in batch order, and drop the ranks' logs."""
    write_atomic(log, "".join(_lines(done[number]) for number in sorted(done)))
    for path in _rank_logs(log):  # after the write: a kill in between leaves the records twice, never none
        path.unlink()


def _logged_seconds(clock: Path) -> dict[int, list[dict]]:
    """`{batch number: [its seconds]}` from a timing log and its ranks' logs (a batch of a run that a kill
    stopped before its seconds were written has none: it is left out of the time per item)."""
    found = {}
    for path in [path for path in (clock, *_rank_logs(clock)) if path.exists()]:
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # the run was stopped while writing this line
            found[entry["batch"]] = [entry]
    return found


def _logged_batches(log: Path, task, items, batches) -> dict[int, list[dict]]:
    """`{batch number: its records}` for each batch whose items are all logged, in `log` or in the logs of
    the ranks of a run of any number of processes (see `_rank_logs`)."""
    found = {}
    for path in [path for path in (log, *_rank_logs(log)) if path.exists()]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # the run was stopped while writing this line
            i = record.get("index")
            if record.get("task") != task.name or not isinstance(i, int) or not 0 <= i < len(items):
                raise ValueError(
                    f"{path}:{number}: not a record of task {task.name!r} ({len(items)} items); start a new run"
                )
            if {k: record.get(k) for k in _reference(items[i])} != _reference(items[i]):
                raise ValueError(f"{path}:{number}: item {i} differs from the task's item {i}; start a new run")
            found[i] = record
    return {number: [found[i] for i in batch] for number, batch in enumerate(batches) if all(i in found for i in batch)}


def _metrics(task, runs: list[list[dict]], seed: int, seeds: list[int]) -> dict:
    """Each metric on all items, before and after, with the paired bootstrap CI of the change; McNemar's p
    where the metric is a mean of per-item 0/1 outcomes (None elsewhere). A task run with several `seeds` (one
    run each) is scored on each item's counts averaged over its runs (a mean of the runs' accuracies, the F1 of
    their pooled counts), its CI over items; McNemar's p needs one outcome per item (None), and each seed's scores
    are listed."""
    kind = task.output_type
    fields, n = scorers.counts(kind), len(runs[0])
    counts = {  # [runs, items, fields]
        v: np.array([[[s[v][f] for f in fields] for s in run] for run in runs], dtype=float)
        for v in ("baseline", "intervened")
    }
    totals = {v: scorers.corpus_metrics(kind, c.mean(axis=0).sum(axis=0), n) for v, c in counts.items()}
    binary = scorers.PAIRED_BINARY.get(kind, scorers.METRICS[kind])
    metrics = {}
    for name in task.metrics:  # those its metric_list names, else all that its scorer computes
        low, high = stats.paired_bootstrap_ci(
            counts["baseline"].mean(axis=0),
            counts["intervened"].mean(axis=0),
            statistic=lambda sums, n, name=name: scorers.corpus_metrics(kind, sums, n)[name],
            seed=seed,
        )
        before, after = float(totals["baseline"][name]), float(totals["intervened"][name])
        paired = name in binary and len(runs) == 1
        outcomes = [[s[v][name] for s in runs[0]] for v in ("baseline", "intervened")] if paired else None
        metrics[name] = {
            "baseline": before,
            "intervened": after,
            "delta": after - before,
            "ci95": [low, high],
            "p_value": stats.mcnemar_p(*outcomes) if paired else None,
            "n": n,
        }
        if len(runs) > 1:
            metrics[name]["seeds"] = {
                str(run_seed): {
                    v: float(scorers.corpus_metrics(kind, c[k].sum(axis=0), n)[name]) for v, c in counts.items()
                }
                for k, run_seed in enumerate(seeds)
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


def progress_bar(disable: bool = False):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
        disable=disable,
    )
