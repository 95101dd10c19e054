"""lm-eval's tasks, before and after: lm-eval runs each task twice on one loaded `intervene` model, with the
intervention switched off and on, and the two runs' per-sample metrics are paired by document.

lm-eval builds the requests, prompts, few-shot examples, filters and metrics, so they are lm-eval's; what is
added is the pairing: each metric's change, its paired bootstrap CI and, for 0/1 outcomes, McNemar's p.
Metrics that lm-eval aggregates by their mean are paired; another aggregation (a corpus F1, BLEU, ...) is
refused by name, since a per-sample value does not add up to it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lm_eval
import numpy as np
from lm_eval.api.metrics import mean
from lm_eval.tasks import TaskManager

from . import stats
from .lm_eval_model import InterveneLM


def task_manager(include_path: str | None) -> TaskManager:
    return TaskManager(include_path=include_path)


def is_lm_eval_task(name: str, manager: TaskManager) -> bool:
    return name in manager.all_tasks


def evaluated_files(tasks: list[str], manager: TaskManager) -> dict[str, list[Path]]:
    """`{task: [the local data files of the split lm-eval scores]}` (its test split, else its validation split)."""
    found = {}
    for name, task in manager.load(tasks)["tasks"].items():
        files = (task.config.dataset_kwargs or {}).get("data_files") or []
        if isinstance(files, dict):
            files = files.get(task.config.test_split or task.config.validation_split) or []
        found[name] = [Path(f) for f in ([files] if isinstance(files, str) else files)]
    return found


def paired(
    lm: InterveneLM,
    tasks: list[str],
    manager: TaskManager,
    *,
    limit: int | None,
    num_fewshot: int | None,
    seed: int,
    out: Path,
):
    """Our results document's `results` and `timing` for lm-eval `tasks`, with lm-eval's own results files
    (`lm_eval_baseline.json`, `lm_eval_intervened.json`) and both outcomes of every sample
    (`samples_<task>.jsonl`) written to `out`."""
    aggregations = {name: task.aggregation() for name, task in manager.load(tasks)["tasks"].items()}
    samples, seconds = {}, {}
    for variant, enabled in (("baseline", False), ("intervened", True)):
        lm.intervention.enabled = enabled
        start = time.perf_counter()
        run = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=True,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )  # fmt: skip
        seconds[variant] = time.perf_counter() - start
        samples[variant] = run.pop("samples")
        (out / f"lm_eval_{variant}.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    lm.intervention.enabled = True
    results, scored = {}, 0
    for task, aggregation in aggregations.items():
        before, after = (_by_document(samples[v][task]) for v in ("baseline", "intervened"))
        if before.keys() != after.keys():
            raise RuntimeError(f"lm-eval scored other documents of {task} in the two runs")
        results[task] = {}
        for filtered in sorted({name for _, name in before}):  # lm-eval's filter ("none": the raw responses)
            keys = sorted(k for k in before if k[1] == filtered)
            for metric in before[keys[0]]["metrics"]:
                if aggregation.get(metric) is not mean:
                    raise ValueError(
                        f"{task}: metric {metric!r} is aggregated by "
                        f"{getattr(aggregation.get(metric), '__name__', aggregation.get(metric))}, not as the mean of "
                        "per-sample values, so it cannot be paired by sample; leave it out of the task's metric_list"
                    )
                base, edited = (np.array([float(s[k][metric]) for k in keys]) for s in (before, after))
                low, high = stats.paired_bootstrap_ci(base, edited, seed=seed)
                binary = bool(np.isin(np.concatenate([base, edited]), (0.0, 1.0)).all())
                results[task][metric if filtered == "none" else f"{metric},{filtered}"] = {
                    "baseline": float(base.mean()), "intervened": float(edited.mean()),
                    "delta": float(edited.mean() - base.mean()), "ci95": [low, high],
                    "p_value": stats.mcnemar_p(base, edited) if binary else None, "n": len(keys),
                }  # fmt: skip
        scored += len({doc for doc, _ in before})
        with open(out / f"samples_{task}.jsonl", "w") as log:
            for k in sorted(before):
                record = {"doc_id": k[0], "filter": k[1], "doc": before[k]["doc"]}
                record |= {v: _outcome(s[k]) for v, s in (("baseline", before), ("intervened", after))}
                log.write(json.dumps(record, default=str) + "\n")
    per_item = {f"{v}_s_per_item": seconds[v] / scored for v in seconds}  # one lm-eval run covers every task
    return results, {task: per_item for task in results}


def _by_document(samples: list[dict]) -> dict[tuple[int, str], dict]:
    return {(sample["doc_id"], sample["filter"]): sample for sample in samples}


def _outcome(sample: dict) -> dict:
    return {"metrics": {m: sample[m] for m in sample["metrics"]}, "filtered_resps": sample["filtered_resps"]}
