"""One call for a paired evaluation, shaped like lm-eval's `simple_evaluate`; `intervene eval` is this call.

    from intervene.evals import EvalSpec, run
    document = run(EvalSpec(method="act", tasks=["mmlu_dev"], limit=32))
    document["results"]["mmlu_dev"]["acc"]  # {"baseline", "intervened", "delta", "ci95", "p_value", "n"}

`run` checks all it can before the model loads (the tasks and their data, the method and its parameters, the
config, the device, the dtype, the output path), so a mistake costs seconds, not a model load. Then it loads the
model once, applies the intervention, scores every task with it off and on, writes the run's folder
(`run.json`, per-sample logs, `results.json`) and returns the results document as written. Tasks are
intervene's own (built-in names, task files) or lm-eval's (names in its registry or under `include_path`),
which lm-eval itself builds and scores twice (see `lm_eval_tasks`).

A mistake is a `ValueError` (a `TaskError` for a task) whose message names the option as the command line
spells it and says how to fix it; an interrupted run raises `Interrupted`, saying what was kept.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate; the fields are `intervene eval`'s options."""

    model: str = "smollm2-135m"  # a built-in name, a local checkpoint directory or a hub id
    method: str | None = None  # a registered method; on a built-in model, the config calibrated for it
    config: str | Path | None = None  # a saved config instead of `method`
    params: dict = field(default_factory=dict)  # method parameters, over the config's if one runs
    uncalibrated: bool = False  # run the method's own defaults, not the config shipped for the model
    tasks: list[str] | None = None  # None: the built-in tasks of the model's kind
    include_path: str | Path | None = None  # a folder of lm-eval task YAMLs
    split: str = "test"
    limit: int | None = None
    num_fewshot: int | None = None  # few-shot examples before each prompt (None: each task's own)
    batch_size: int = 16
    device: str | None = None
    device_map: str | None = None
    dtype: str | None = None
    add_bos_token: bool = False
    output_path: str | Path = "intervene_results"  # a folder for the run's folder, or the results' .json file
    seed: int = 1234
    seeds: int = 1  # runs of each task that samples, with the seeds seed, seed + 1, ...
    file_fields: dict = field(default_factory=dict)  # how to read a plain data file: output_type, doc_to_*, ...
    resume: str | Path | None = None  # the folder of an interrupted run, to continue
    plot: bool = False


class Interrupted(KeyboardInterrupt):
    """The run was interrupted; the message says what was kept and how to continue."""


def run(spec: EvalSpec | dict, say=lambda text: print(text, file=sys.stderr)) -> dict:
    """Evaluate `spec` (an `EvalSpec`, or a dict of its fields) and return the results document; `say`
    receives the notes a user should read (which config runs, ...)."""
    spec = spec if isinstance(spec, EvalSpec) else EvalSpec(**spec)
    if (spec.method is None) == (spec.config is None):
        raise ValueError("give exactly one of --method NAME or --config FILE (see `intervene methods`)")
    if spec.uncalibrated and spec.config is not None:
        raise ValueError("--uncalibrated goes with --method: it runs the method's defaults instead of a config")
    from .model import shipped_config

    if spec.method and not spec.uncalibrated and (shipped := shipped_config(spec.model, spec.method)):
        given = ", ".join(f"{key}={json.dumps(value)}" for key, value in spec.params.items())
        say(f"using the {spec.method} config calibrated for {spec.model} that ships with intervene"
            f"{f', with --param {given} over its parameters' if given else ''}: {shipped}")  # fmt: skip
        say("(--uncalibrated runs the method's own defaults, --config another config)")
        spec = replace(spec, method=None, config=shipped)
    check_placement(spec.device, spec.device_map, spec.dtype)
    if lm_eval_tasks := _lm_eval_tasks(spec.tasks, spec.include_path):
        refused = {"--resume": spec.resume, "--plot": spec.plot, "--device-map": spec.device_map}
        refused |= {"--seeds": spec.seeds != 1}
        refused |= {"--split": spec.split != "test"} | {
            f"--{k.replace('_', '-')}": v for k, v in spec.file_fields.items()
        }
        if given := [flag for flag, value in refused.items() if value]:
            raise ValueError(
                f"{', '.join(given)}: not for lm-eval tasks, whose splits and fields lm-eval reads from them"
            )
        return _run_lm_eval(spec, *lm_eval_tasks)
    return _run_own(spec)


def _run_own(spec: EvalSpec) -> dict:
    """Intervene's own tasks through the paired runner (see `runner`)."""
    import torch
    from accelerate.utils import broadcast_object_list

    import intervene

    from . import report, runner
    from .inspect import require_matplotlib
    from .model import is_vision_language, smoke_test_warning, starts_with_bos
    from .tasks import builtin_tasks, check_modality, check_seeds

    if spec.resume is not None:  # read before the model loads: a folder that is no run fails at once
        try:
            earlier = json.loads((Path(spec.resume) / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            earlier = None
        if not isinstance(earlier, dict):
            raise ValueError(
                f"--resume {spec.resume}: no run.json of an intervene eval there; give the folder of that run"
            )
    vision = is_vision_language(spec.model)
    default = [name for name, task in builtin_tasks().items() if task.needs_images == vision]
    chosen = resolve_tasks(spec.tasks, spec.file_fields, default)
    if spec.num_fewshot is not None:  # as lm-eval's --num_fewshot: over each task's own
        chosen = [replace(task, num_fewshot=spec.num_fewshot) for task in chosen]
    check_modality(chosen, spec.model, vision)
    check_seeds(spec.seeds, chosen)
    for task in chosen:  # fail on a broken task or a missing image before loading anything heavy
        task.items(spec.split, spec.limit)
    method = intervention(spec)
    if spec.config:
        check_not_calibrated_on(Path(spec.config), chosen, spec.split)
    if spec.plot:
        require_matplotlib()
    # Every check above fails alike on every process, before the processes first wait for each other here.
    ranks = runner.processes(spec.device)
    if ranks.num_processes > 1 and spec.device_map is not None:
        raise ValueError("--device-map spreads one model over the devices; use it in a single process")
    device = str(ranks.device) if ranks.num_processes > 1 and spec.device is None else spec.device  # each its own
    folder, results_file = _output(spec.output_path)
    if spec.resume is None:
        make_folder(folder)
    torch.manual_seed(spec.seed)
    model, tokenizer = intervene.load_model(
        spec.model, dtype=spec.dtype, device=device, device_map=spec.device_map, add_bos_token=spec.add_bos_token
    )
    handle = intervene.apply(model, method, **spec.params)
    settings = {
        "model": spec.model, "intervention": {k: handle.to_dict()[k] for k in ("method", "params")},
        "tasks": [t.name for t in chosen], "task_settings": {t.name: t.settings() for t in chosen},
        "split": spec.split, "limit": spec.limit, "batch_size": spec.batch_size, "seed": spec.seed,
        "dtype": str(model.dtype).removeprefix("torch."), "add_bos_token": starts_with_bos(tokenizer),
    } | ({"seeds": spec.seeds} if spec.seeds > 1 else {})  # fmt: skip
    settings = json.loads(json.dumps(settings))  # as it reads back from the file
    stamp = _stamp()
    if spec.resume is not None:
        run_dir = Path(spec.resume)
        if changed := [key for key in settings if earlier.get(key) != settings[key]]:
            handle.remove()
            differences = "; ".join(
                f"{key} {json.dumps(earlier.get(key))} there, {json.dumps(settings[key])} now" for key in changed
            )
            raise ValueError(
                f"--resume {run_dir}: that run had other settings ({differences}); repeat its exact arguments"
            )
    else:  # rank 0 makes the run folder, named by its clock, for every process to write to
        (run_dir,) = broadcast_object_list([new_run_dir(folder, stamp) if ranks.is_main_process else None])
        if ranks.is_main_process:  # the others write only once the runner has waited for this one
            report.write_atomic(run_dir / "run.json", json.dumps(settings, indent=2) + "\n")
    try:
        results, timing = runner.evaluate(
            model, tokenizer, handle, chosen, samples_dir=run_dir, split=spec.split, limit=spec.limit,
            batch_size=spec.batch_size, seed=spec.seed, seeds=spec.seeds, resume=spec.resume is not None,
        )  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: the items scored so far are logged in {run_dir}/samples_*.jsonl; run the same command "
            f"with --resume {run_dir} to continue"
        ) from None
    finally:
        handle.remove()
    if not ranks.is_main_process:
        return {}  # rank 0 reports for every process
    document = {
        "results": results,
        "smoke_test": smoke_test_warning(model),
        "config": {
            "model": spec.model, "tasks": [t.name for t in chosen],
            "task_settings": {t.name: t.settings() for t in chosen}, "split": spec.split, "limit": spec.limit,
            "batch_size": spec.batch_size, "device": str(model.device), "device_map": spec.device_map,
            "processes": ranks.num_processes, "dtype": str(model.dtype).removeprefix("torch."),
            "add_bos_token": starts_with_bos(tokenizer), "output_path": str(results_file or run_dir / "results.json"),
        },
        "intervention": _intervention_record(handle, spec.config),
        "versions": report.versions(),
        "seed": spec.seed,
        **({"seeds": spec.seeds} if spec.seeds > 1 else {}),
        "timing": timing,
        "date": stamp,
    }  # fmt: skip
    _write(document)
    if spec.plot:
        from .plot import plot_results

        title = f"{spec.model} · {handle.method}"
        if document["smoke_test"]:
            title += " · SMOKE TEST: random weights, scores mean nothing"
        plot_results(results, Path(document["config"]["output_path"]).with_suffix(".png"), title=title)
    return document


def _run_lm_eval(spec: EvalSpec, names: list[str], manager) -> dict:
    """lm-eval's tasks: lm-eval scores them twice on one loaded model, intervention off and on."""
    from . import lm_eval_tasks, report
    from .lm_eval_model import InterveneLM

    if spec.config:
        read_config(Path(spec.config))
        check_not_calibrated_on(Path(spec.config), [], spec.split, lm_eval_tasks.evaluated_files(names, manager))
    folder, results_file = _output(spec.output_path)
    make_folder(folder)
    lm = InterveneLM(
        pretrained=spec.model, method=spec.method, config=str(spec.config) if spec.config else None, dtype=spec.dtype,
        add_bos_token=spec.add_bos_token, device=spec.device, batch_size=spec.batch_size, **spec.params,
    )  # fmt: skip
    run_dir = new_run_dir(folder, _stamp())
    try:
        results, timing = lm_eval_tasks.paired(
            lm, names, manager, limit=spec.limit, num_fewshot=spec.num_fewshot, seed=spec.seed, out=run_dir
        )
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: lm-eval's runs are not resumable; {run_dir} holds what finished") from None
    finally:
        lm.intervention.remove()
    document = {
        "results": results,
        "config": {
            "model": spec.model, "harness": "lm-eval", "tasks": names, "limit": spec.limit,
            "num_fewshot": spec.num_fewshot,
            "batch_size": spec.batch_size, "device": str(lm.model.device),
            "dtype": str(lm.model.dtype).removeprefix("torch."), "add_bos_token": spec.add_bos_token,
            "output_path": str(results_file or run_dir / "results.json"),
        },
        "intervention": _intervention_record(lm.intervention, spec.config),
        "versions": report.versions(),
        "seed": spec.seed,
        "timing": timing,
        "date": run_dir.name,
    }  # fmt: skip
    _write(document)
    return document


def intervention(spec: EvalSpec):
    """The method name or loaded config that `spec` applies, checked (with its parameters) before a model loads."""
    import intervene
    from intervene.interventions import method_class

    if spec.config:
        read_config(Path(spec.config))
        return intervene.load_config(spec.config)
    method_class(spec.method).from_dict(spec.params)  # an unknown method or a bad value fails here
    return spec.method


def _write(document: dict) -> None:
    from .report import write_atomic

    write_atomic(Path(document["config"]["output_path"]), json.dumps(document, indent=2) + "\n")


def _intervention_record(handle, config) -> dict:
    """The resolved intervention as the results keep it, with the config file it came from, if any."""
    return {**handle.to_dict(), "config_file": str(config) if config else None}


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")


def _output(output_path) -> tuple[Path, Path | None]:
    """`(folder, results file)`: the folder the run's folder goes in, and the file its results go to when the
    output path names one (ends in .json; else `results.json` in the run's folder)."""
    path = Path(output_path)
    if path.suffix != ".json":
        return path, None
    if path.is_dir():
        raise ValueError(f"--output-path {path} is a folder; a path ending in .json names the results file")
    return path.parent, path


# Checks shared with `intervene calibrate` and `intervene inspect`.


def check_placement(device: str | None, device_map: str | None, dtype: str | None) -> None:
    """A device this machine lacks, a device with a device map, or a dtype `load_model` would refuse fail here."""
    from .model import parse_dtype

    if device is not None and device_map is not None:
        raise ValueError("give --device or --device-map, not both (a device map places the model itself)")
    try:
        parse_dtype(dtype)
    except ValueError as error:
        raise ValueError(f"--{error}") from None
    if device is None:
        return
    import torch

    try:
        wanted = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; give cpu, cuda, cuda:1, ...") from None
    if wanted.type == "cpu":
        return
    here = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    count = torch.accelerator.device_count() if here is not None else 0
    if here is None or here.type != wanted.type or (wanted.index or 0) >= count:
        found = f"{count} {here.type} device(s)" if here is not None else "no accelerator"
        raise ValueError(f"--device {device}: torch {torch.__version__} finds {found} here; give --device cpu, or "
                         "leave --device out to use the accelerator if there is one")  # fmt: skip


def make_folder(path: Path) -> None:
    """Create the output folder now, so that a path that cannot be one fails before the model loads."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-path {path} is a file, not a folder; give a folder path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"--output-path {path}: cannot create this folder ({error.strerror}); give another path"
        ) from None


def new_run_dir(folder: Path, stamp: str) -> Path:
    """A new folder `folder/<stamp>`; runs started in the same second get `<stamp>-2`, `<stamp>-3`, ..."""
    for number in itertools.count(1):
        run_dir = folder / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            run_dir.mkdir()  # atomic: of two runs racing for a name, one gets it and the other takes the next
            return run_dir
        except FileExistsError:
            continue


def read_config(path: Path) -> dict:
    """The JSON document of a saved config; an unreadable or malformed file is an error naming it."""
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise ValueError(
            f"--config {path}: cannot be read ({error.strerror}); give the path of a saved config"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--config {path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); give a "
            "config written by `intervene calibrate` or `handle.save`"
        ) from None


def check_not_calibrated_on(path: Path, tasks: list, split: str, lm_eval_files: dict | None = None) -> None:
    """A calibrated config is never scored on what it was tuned on: neither its split nor its data files (those of
    intervene's `tasks` at `split`, or `{task: [files]}` that lm-eval tasks read)."""
    calibration = read_config(path).get("calibration")
    if not isinstance(calibration, dict):
        return
    if tasks and calibration.get("split") == split:
        raise ValueError(f"{path} was calibrated on the {split!r} split; evaluate it on another (--split test)")
    entries = calibration.get("tasks") or {}  # {task: {"files": path, ...}}, or {task: path} for prune
    tuned = {Path(e["files"] if isinstance(e, dict) else e).resolve() for e in entries.values()}
    scored = [(Path(task.data_files[task.split(split)]), f"the {split!r} data of task {task.name!r}") for task in tasks]
    scored += [(file, f"data that lm-eval scores for task {name!r}") for name, files in (lm_eval_files or {}).items()
               for file in files]  # fmt: skip
    for data, what in scored:
        if data.resolve() in tuned:
            raise ValueError(
                f"{path} was calibrated on {data}, which is {what}; evaluate it on items it was not tuned on (a YAML "
                "with data_files: {calib: ..., test: ...} keeps them apart)"
            )


def resolve_tasks(tasks: list[str] | None, fields: dict, default: list[str]) -> list:
    """The tasks named (or the `default` built-in ones); two that share a name (which keys the results and the
    log files) are an error, and so are data-file fields that no task given would read."""
    from .tasks import TaskError, builtin_tasks, resolve_task

    specs = tasks or default
    given = [f"--{name.replace('_', '-')}" for name, value in fields.items() if value is not None]
    if given and all(spec in builtin_tasks() for spec in specs):
        raise TaskError(
            f"{', '.join(given)} say how to read a data file, and {', '.join(specs)} are built-in tasks with "
            "settings of their own; give a data file with --tasks (e.g. --tasks my.jsonl)"
        )
    chosen, sources = [], {}
    for spec in specs:
        task = resolve_task(spec, **fields)
        if task.name in sources:
            raise TaskError(
                f"--tasks {sources[task.name]} and {spec} are both task {task.name!r}, and a run keeps one result "
                "per task name; rename one of the files, or give it a YAML with its own `task:` name"
            )
        sources[task.name] = spec
        chosen.append(task)
    return chosen


def _lm_eval_tasks(tasks: list[str] | None, include_path) -> tuple[list[str], object] | None:
    """`(names, task manager)` when the tasks are lm-eval's (under `include_path`, or in its registry); None when
    they are intervene's own: built-in names and task files."""
    from .tasks import FORMATS, TaskError, builtin_tasks

    specs = tasks or []
    ours = (*FORMATS, ".yaml", ".yml")  # task files
    theirs = [spec for spec in specs if spec not in builtin_tasks() and Path(spec).suffix not in ours]
    if include_path is None and not theirs:
        return None
    try:
        from . import lm_eval_tasks
    except ImportError:
        if include_path is None:
            return None  # intervene's own task resolution names the unknown task
        raise ValueError("--include-path: lm-eval tasks need lm-eval: pip install 'intervene[lm-eval]'") from None
    if not theirs:
        raise ValueError("--include-path goes with --tasks naming the lm-eval tasks to run")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path}: not a folder; give the folder of your lm-eval task YAMLs")
    manager = lm_eval_tasks.task_manager(str(include_path) if include_path else None)
    if unknown := [spec for spec in theirs if not lm_eval_tasks.is_lm_eval_task(spec, manager)]:
        under = f" (nor under --include-path {include_path})" if include_path else ""
        raise TaskError(
            f"unknown task {', '.join(map(repr, unknown))}: not a built-in task ({', '.join(builtin_tasks())}), "
            f"a task file ({', '.join(ours)}), or a task lm-eval knows{under}"
        )
    if len(theirs) < len(specs):
        raise ValueError(f"--tasks {','.join(specs)}: run intervene's own tasks and lm-eval's ({', '.join(theirs)}) "
                         "separately")  # fmt: skip
    return specs, manager
