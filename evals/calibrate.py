"""Calibration: find the heads (and, for ZeroTuning, the strength) where an intervention helps.

The engine of methods-llm §8.6: the baseline is scored once on a `calib` split; then each candidate
(one layer, one head index across layers, or one (layer, head)) gets the intervention alone and is
scored on the same items. A selection rule keeps the candidates that helped; for ZeroTuning a grid of
gammas is then tried on the selected heads. A candidate's worth is the change it makes to the mean, over
tasks, of each task's first metric (accuracy), or (`objective="worst"`) its smallest per-task change.
`no_regress=t` keeps only candidates under which no calibration task loses more than `t`, and adds them
best first only while their union still keeps every task within `t` and gains: a head that helps one
task by hurting another is not bought.

Every finished candidate is appended to `profile.jsonl` in the output folder, so a run that is
interrupted and restarted with the same arguments skips what it already did and ends with the same
artifact. The artifact is a config that `intervene.load_config` and `intervene eval --config` replay,
plus the whole profiling table and the calibration data spec.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import scorers
from .model import starts_with_bos
from .report import write_atomic
from .runner import progress_bar

GRANULARITIES = ("layer", "head_index", "head")
RULES = ("min_delta", "top_k", "top_fraction", "no_regress")
OBJECTIVES = ("mean", "worst")
AGGREGATES = ("objective", "entropy")  # the keys of `objective`'s scores that are not tasks


def candidates(granularity: str, layers: list[int], num_heads: int) -> list[dict]:
    """Each candidate is a label and the `heads` scope `{layer: [heads]}` it turns on alone."""
    every = list(range(num_heads))
    if granularity == "layer":
        return [{"label": f"layer {layer}", "heads": {layer: every}} for layer in layers]
    if granularity == "head_index":
        return [{"label": f"head {h} of every layer", "heads": {layer: [h] for layer in layers}} for h in every]
    if granularity == "head":
        return [{"label": f"layer {layer} head {h}", "heads": {layer: [h]}} for layer in layers for h in every]
    raise ValueError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")


def task_deltas(scores: dict, baseline: dict) -> dict[str, float]:
    """Each calibration task's change of its first metric from the baseline."""
    return {name: scores[name] - baseline[name] for name in baseline if name not in AGGREGATES}


def worth(scores: dict, baseline: dict, objective: str) -> float:
    """What a configuration gains: the change of the mean over tasks, or its smallest per-task change."""
    if objective == "mean":
        return scores["objective"] - baseline["objective"]
    return min(task_deltas(scores, baseline).values())


def select(profile: list[dict], rule: str, value: float, objective: str = "mean") -> list[dict]:
    """The candidates a rule keeps, best first by their `objective` gain (`delta` or `worst`); never one that
    gains nothing.

    - `min_delta`: every candidate that gains at least `value`;
    - `top_k`: the `value` best;
    - `top_fraction`: the best `value` fraction (rounded up);
    - `no_regress`: every candidate under which no task loses more than `value` (`calibrate` then checks their
      unions).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    key = "delta" if objective == "mean" else "worst"
    ranked = sorted(profile, key=lambda c: -c[key])  # stable: ties keep the sweep's order
    if rule == "min_delta":
        kept = [c for c in ranked if c[key] >= value]
    elif rule == "top_k":
        kept = ranked[: int(value)]
    elif rule == "top_fraction":
        kept = ranked[: math.ceil(value * len(ranked))]
    elif rule == "no_regress":
        kept = [c for c in ranked if min(c["deltas"].values()) >= -value]
    else:
        raise ValueError(f"selection rule {rule!r} is not one of {', '.join(RULES)}")
    return [c for c in kept if c[key] > 0]


def union(chosen: list[dict]) -> dict[int, list[int]]:
    heads: dict[int, set[int]] = {}
    for candidate in chosen:
        for layer, hs in candidate["heads"].items():
            heads.setdefault(int(layer), set()).update(hs)
    return {layer: sorted(hs) for layer, hs in sorted(heads.items())}


def score_tasks(model, tokenizer, tasks: dict, batch_size: int, seed: int = 0) -> dict[str, float]:
    """Each task's mean first metric on its items (`tasks`: task -> items), their mean as `objective`,
    and the mean entropy over the choices of the tasks that have choices (`entropy`, label-free). A task that
    samples draws each batch from torch's generator seeded `scorers.batch_seed(seed, batch number)`, the same
    for every candidate."""
    scores, entropies = {}, []
    for name, (task, items) in tasks.items():
        metric = scorers.METRICS[task.output_type][0]
        items = sorted(items, key=lambda item: -len(item.query))  # similar lengths share a batch
        results = []
        for start in range(0, len(items), batch_size):
            torch.manual_seed(scorers.batch_seed(seed, start // batch_size))
            results += scorers.score(task, items[start : start + batch_size], model, tokenizer)
        scores[name] = float(np.mean([r[metric] for r in results]))
        entropies += [r["entropy"] for r in results if "entropy" in r]
    scores["objective"] = float(np.mean(list(scores.values())))
    if entropies:
        scores["entropy"] = float(np.mean(entropies))
    return scores


class ProfileLog:
    """The append-only record of a calibration run; its first line pins the run's settings."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            lines = []
            for line in path.read_text().splitlines():
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # the run was killed while writing this line: it is profiled again
            if lines and lines[0] != {"settings": settings}:
                raise ValueError(
                    f"{path} belongs to a calibration run with other settings; "
                    "resume it with the same arguments, or choose another --output-path"
                )
            self.done = {entry["key"]: entry for entry in lines[1:]}
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        # rewritten whole, so that what is appended next starts on a line of its own
        write_atomic(path, "".join(json.dumps(line) + "\n" for line in [{"settings": settings}, *self.done.values()]))

    def get_or_run(self, key: str, run) -> dict:
        if key not in self.done:
            entry = {"key": key, **run()}
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            self.done[key] = entry
        return self.done[key]


def calibrate(
    model, tokenizer, method: str, params: dict, tasks: list, *, granularity="layer", rule="min_delta",
    value=0.0, objective="mean", gammas=(), gamma_by="accuracy", split="calib", limit=None, batch_size=16, seed=0,
    output: Path, say=print,
) -> dict:  # fmt: skip
    """Profile, select and return the artifact (also written to `output/config.json`). The gamma grid
    is judged `by` calibration accuracy (the `objective`'s gain; under `no_regress`, among the gammas that keep
    every task within the tolerance), or by the lowest entropy over choices (no labels needed)."""
    import intervene

    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if split == "test":
        raise ValueError("calibrating on the test split would tune on the numbers you report; use the calib split")
    if gamma_by not in ("accuracy", "entropy"):
        raise ValueError(f"gamma_by={gamma_by!r} is not one of accuracy, entropy")
    if gamma_by == "entropy" and all(task.output_type == "generate_until" for task in tasks):
        raise ValueError("gamma_by='entropy' needs a multiple_choice or classification task")
    spec = intervene.model_spec(model)
    with intervene.apply(model, method, **params) as profiled:  # checked and resolved against the model
        layers = list(profiled.config.layers)
    items = {task.name: (task, task.items(split, limit)) for task in tasks}
    settings = {
        "model": spec.name_or_path, "method": method, "params": params, "tasks": sorted(items), "split": split,
        "limit": limit, "granularity": granularity, "rule": rule, "value": value, "objective": objective,
        "gammas": list(gammas), "gamma_by": gamma_by, "seed": seed,
    }  # fmt: skip
    log = ProfileLog(Path(output) / "profile.jsonl", json.loads(json.dumps(settings)))

    def scored(config: dict):
        def run():
            with intervene.apply(model, method, **config):
                return {"scores": score_tasks(model, tokenizer, items, batch_size, seed)}

        return run

    sweep = candidates(granularity, layers, spec.num_heads)
    n_items = sum(len(i) for _, i in items.values())
    say(
        f"calibrating {method} on {n_items} {split} items of {', '.join(items)}: baseline + {len(sweep)} "
        f"candidates ({granularity}) + {len(gammas)} gammas + the selection = "
        f"{(len(sweep) + len(gammas) + 2) * n_items} item scorings"
    )
    began = time.perf_counter()
    baseline = log.get_or_run("baseline", lambda: {"scores": score_tasks(model, tokenizer, items, batch_size, seed)})
    baseline = baseline["scores"]
    if (elapsed := time.perf_counter() - began) > 1:  # scored now, not read back from the log
        rest = elapsed * (len(sweep) + len(gammas) + 1) / 60
        say(f"baseline took {elapsed:.0f} s: the rest needs about {rest:.0f} min")
    profile = []
    with progress_bar() as progress:
        bar = progress.add_task("candidates", total=len(sweep))
        for candidate in sweep:
            entry = log.get_or_run(candidate["label"], scored({**params, "heads": candidate["heads"]}))
            scores = entry["scores"]
            deltas = task_deltas(scores, baseline)
            delta, worst = worth(scores, baseline, "mean"), worth(scores, baseline, "worst")
            profile.append({**candidate, "scores": scores, "deltas": deltas, "delta": delta, "worst": worst})
            progress.advance(bar)
    chosen = select(profile, rule, value, objective)
    unions = []
    if rule == "no_regress":  # best first, each kept only if the union with those before it still holds
        kept, gained = [], 0.0
        for candidate in chosen:
            trial = [*kept, candidate]
            label = " + ".join(c["label"] for c in trial)
            run = scored({**params, "heads": union(trial)})
            scores = candidate["scores"] if not kept else log.get_or_run(f"union: {label}", run)["scores"]
            deltas = task_deltas(scores, baseline)
            holds = min(deltas.values()) >= -value and worth(scores, baseline, objective) > gained
            unions.append({"union": label, "scores": scores, "deltas": deltas, "kept": holds})
            if holds:
                kept, gained = trial, worth(scores, baseline, objective)
        chosen = kept
    final = {**params, "heads": union(chosen)}
    tried = []
    for gamma in gammas:  # ZeroTuning: the strength, on the selected heads
        entry = log.get_or_run(f"gamma {gamma}", scored({**final, "gamma": gamma}))
        deltas = task_deltas(entry["scores"], baseline)
        tried.append({"gamma": gamma, "scores": entry["scores"], "deltas": deltas})
    if tried and gamma_by == "entropy":
        final["gamma"] = min(tried, key=lambda t: t["scores"]["entropy"])["gamma"]
    elif tried:
        allowed = [t for t in tried if rule != "no_regress" or min(t["deltas"].values()) >= -value]
        if allowed:
            final["gamma"] = max(allowed, key=lambda t: worth(t["scores"], baseline, objective))["gamma"]
        else:  # every strength costs some task more than the tolerance: nothing is kept
            chosen, final = [], {**params, "heads": {}}
    selected = log.get_or_run("selected", scored(final))["scores"]

    artifact = _artifact(
        model, method, final,
        {
            "split": split,
            "tasks": {name: {"items": len(i), "files": t.data_files[t.split(split)]} for name, (t, i) in items.items()},
            "add_bos_token": starts_with_bos(tokenizer),
            "limit": limit,
            "seed": seed,
            "granularity": granularity,
            "selection": {rule: value},
            "objective": objective,
            "profiled_with": params,
            "baseline": baseline,
            "profile": profile,
            **({"unions": unions} if rule == "no_regress" else {}),
            "selected": [c["label"] for c in chosen],
            "gammas": tried,
            "gamma_by": gamma_by,
            "result": selected,
            "result_deltas": task_deltas(selected, baseline),
        },
    )  # fmt: skip
    write_atomic(Path(output) / "config.json", json.dumps(artifact, indent=2) + "\n")
    return artifact


def _artifact(model, method: str, params: dict, calibration: dict) -> dict:
    """A config file that `intervene.load_config` replays, plus how it was found."""
    import intervene

    with intervene.apply(model, method, **params) as handle:  # the document `handle.save` writes
        return {**handle.to_dict(), "calibration": calibration}


def fit_prune_trend(model, processor, params: dict, tasks: list, *, split="calib", limit=None, batch_size=8,
                    output: Path, say=print) -> dict:  # fmt: skip
    """Fit the positional trend that `prune`'s `debias="position"` divides out: the attention each image
    position receives at the pruning layer's scoring step, averaged over the (unlabelled) calibration
    prompts, fitted with f(x) = mu * exp(sigma * x). Writes and returns a config that replays it."""
    import torch

    import intervene
    from intervene.interventions.prune import fit_trend

    if split == "test":
        raise ValueError("calibrating on the test split would tune on the numbers you report; use the calib split")
    spec = intervene.model_spec(model)
    scoring = {**params, "keep": 1.0, "debias": "none", "trend": None, "select": None}  # score, drop nothing
    intervene.apply(model, "prune", **scoring).remove()  # its parameters checked before any prompt is read
    layer = scoring.get("layer", 2) - 1
    items = [item for task in tasks for item in task.items(split, limit) if item.image is not None]
    if not items:
        raise ValueError(f"prune calibration needs image prompts; the tasks given have none in split {split!r}")
    say(f"fitting prune's positional trend at layer {layer} on {len(items)} {split} prompts")
    total, count = None, 0
    with intervene.apply(model, "prune", **scoring) as handle, progress_bar() as progress, torch.no_grad():
        bar = progress.add_task("prompts", total=len(items))
        for start in range(0, len(items), batch_size):
            inputs = scorers._image_inputs(items[start : start + batch_size], processor, model.dtype)
            device = scorers.input_device(model)
            model(**{k: v.to(device) for k, v in inputs.items()})
            image = inputs["input_ids"].to(device) == spec.image_token_id
            scores = handle.state.scores[image].view(image.shape[0], -1)  # [B, L] at layer `layer`
            total = scores.sum(0) if total is None else total + scores.sum(0)
            count += scores.shape[0]
            progress.advance(bar, scores.shape[0])
    mean = (total / count).cpu()
    trend = fit_trend(mean)
    debias = {"none": "position", "padding": "both"}.get(params.get("debias", "none"), params.get("debias"))
    final = {**params, "debias": debias, "trend": trend}
    artifact = _artifact(
        model, "prune", final,
        {
            "split": split,
            "tasks": {t.name: t.data_files[t.split(split)] for t in tasks},
            "add_bos_token": starts_with_bos(processor),
            "prompts": count,
            "mean_attention": mean.tolist(),
            "trend": trend,
        },
    )  # fmt: skip
    Path(output).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(output) / "config.json", json.dumps(artifact, indent=2) + "\n")
    return artifact
