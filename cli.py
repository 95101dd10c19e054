"""The `intervene` command line. Heavy imports happen inside commands so that `--help` is instant."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="intervene",
    help="Training-free attention interventions for Hugging Face models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Training-free attention interventions for Hugging Face models."""


BOS_HELP = (
    "Start every prompt with the tokenizer's BOS token, as lm-eval's add_bos_token (SmolLM2, GPT-2 and Qwen add "
    "none, so their initial token is otherwise a word). Recorded in the results."
)

DTYPE_HELP = "float32 (fp32, float), bfloat16 (bf16), float16 (fp16, half) or auto (default: the checkpoint's)."


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _check_device(device: str | None) -> None:
    """A device that torch cannot parse or that this machine lacks fails here, before anything loads."""
    if device is None:
        return
    import torch

    try:
        wanted = torch.device(device)
    except RuntimeError:
        raise _fail(f"--device {device!r} is not a device; give cpu, cuda, cuda:1, ...") from None
    if wanted.type == "cpu":
        return
    here = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    count = torch.accelerator.device_count() if here is not None else 0
    if here is None or here.type != wanted.type or (wanted.index or 0) >= count:
        found = f"{count} {here.type} device(s)" if here is not None else "no accelerator"
        raise _fail(f"--device {device}: torch {torch.__version__} finds {found} here; give --device cpu, or "
                    "leave --device out to use the accelerator if there is one")  # fmt: skip


def _check_dtype(dtype: str | None) -> None:
    """A --dtype that `load_model` would refuse fails here, before anything loads (one parser for both)."""
    from intervene.evals.model import parse_dtype

    try:
        parse_dtype(dtype)
    except ValueError as error:
        raise _fail(f"--{error}") from None


def _make_folder(path: Path) -> None:
    """Create the output folder now, so that a path that cannot be one fails before the model loads."""
    if path.exists() and not path.is_dir():
        raise _fail(f"--output-path {path} is a file, not a folder; give a folder path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _fail(f"--output-path {path}: cannot create this folder ({error.strerror}); give another path") from None


def _new_run_dir(output_path: Path, stamp: str) -> Path:
    """A new folder `output_path/<stamp>`; runs started in the same second get `<stamp>-2`, `<stamp>-3`, ..."""
    for number in itertools.count(1):
        run_dir = output_path / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            run_dir.mkdir()  # atomic: of two runs racing for a name, one gets it and the other takes the next
            return run_dir
        except FileExistsError:
            continue


def _read_config(path: Path) -> dict:
    """The JSON document of a saved config; an unreadable or malformed file is an error naming it."""
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise _fail(f"--config {path}: cannot be read ({error.strerror}); give the path of a saved config") from None
    except json.JSONDecodeError as error:
        raise _fail(
            f"--config {path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); give a "
            "config written by `intervene calibrate` or `handle.save`"
        ) from None


def _check_not_calibrated_on(path: Path, document: dict, tasks: list, split: str) -> None:
    """A calibrated config is never scored on what it was tuned on: neither its split nor its data files."""
    calibration = document.get("calibration")
    if not isinstance(calibration, dict):
        return
    if calibration.get("split") == split:
        raise ValueError(f"{path} was calibrated on the {split!r} split; evaluate it on another (--split test)")
    entries = calibration.get("tasks") or {}  # {task: {"files": path, ...}}, or {task: path} for prune
    tuned = {Path(e["files"] if isinstance(e, dict) else e).resolve() for e in entries.values()}
    for task in tasks:
        data = Path(task.data_files[task.split(split)]).resolve()
        if data in tuned:
            raise ValueError(
                f"{path} was calibrated on {data}, which is the {split!r} data of task {task.name!r}; evaluate it "
                "on items it was not tuned on (a YAML with data_files: {calib: ..., test: ...} keeps them apart)"
            )


def _resolve_tasks(tasks: str | None, fields: dict, default: list[str]) -> list:
    """The tasks of `--tasks` (or the `default` built-in ones); two that share a name (which keys the results
    and the log files) are an error, and so are data-file flags that no task given would read."""
    from intervene.evals.tasks import TaskError, builtin_tasks, resolve_task

    specs = [spec.strip() for spec in tasks.split(",") if spec.strip()] if tasks else default
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


def _params(pairs: list[str]) -> dict:
    """`key=value` pairs; a value is read as JSON when it parses (numbers, lists, {...}), else as text."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _fail(f"--param {pair!r} is not key=value (e.g. --param beta=0.3)")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


@app.command("eval")
def evaluate(
    method: Annotated[
        str | None, typer.Option(help="Intervention to compare with the baseline (see `intervene methods`).")
    ] = None,
    model: Annotated[
        str, typer.Option(help="Built-in model name, local checkpoint directory or hub id.")
    ] = "smollm2-135m",
    param: Annotated[
        list[str] | None,
        typer.Option(help="Method parameter as key=value, overriding the config's if one runs; repeatable."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="A saved intervention config (JSON) instead of --method.")] = None,
    uncalibrated: Annotated[
        bool,
        typer.Option(
            "--uncalibrated",
            help="On a built-in model, run the method's own defaults instead of the config calibrated for it.",
        ),
    ] = False,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated built-in task names or task files (default: the built-in tasks of the "
            "model's kind: text tasks for a language model, image tasks for a vision-language one)."
        ),
    ] = None,
    include_path: Annotated[
        Path | None,
        typer.Option("--include-path", "--include_path", help="A folder of lm-eval task YAMLs, for lm-eval --tasks."),
    ] = None,
    split: Annotated[str, typer.Option(help="Which split of each task to score.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N items of each task.")] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "--batch_size", min=1, help="Items per forward pass.")
    ] = 16,
    device: Annotated[
        str | None,
        typer.Option(
            help="cpu, cuda, cuda:1, ... (default: cuda if available; under accelerate launch, each process its own)."
        ),
    ] = None,
    device_map: Annotated[
        str | None,
        typer.Option(
            "--device-map",
            "--device_map",
            help="auto, balanced, balanced_low_0 or sequential: spread a model too large for one device.",
        ),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help=DTYPE_HELP)] = None,
    add_bos_token: Annotated[bool, typer.Option("--add-bos-token", "--add_bos_token", help=BOS_HELP)] = False,
    output_path: Annotated[
        Path, typer.Option("--output-path", "--output_path", help="Folder for the results JSON and per-sample logs.")
    ] = Path("intervene_results"),
    seed: Annotated[int, typer.Option(help="Seed for the bootstrap (decoding is greedy).")] = 1234,
    output_type: Annotated[
        str | None,
        typer.Option(help="For a plain data file: multiple_choice, classification, generate_until or pope."),
    ] = None,
    doc_to_text: Annotated[
        str | None, typer.Option(help="For a plain data file: field or Jinja template of the prompt.")
    ] = None,
    doc_to_choice: Annotated[
        str | None, typer.Option(help="For a plain data file: field or template of the choices.")
    ] = None,
    doc_to_target: Annotated[
        str | None, typer.Option(help="For a plain data file: field or template of the answer.")
    ] = None,
    doc_to_image: Annotated[
        str | None, typer.Option(help="For a plain data file: field holding each record's image path.")
    ] = None,
    image_root: Annotated[
        str | None, typer.Option(help="For a plain data file: folder the image paths are relative to.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="The folder of an interrupted run: continue it (same arguments) without redoing items."),
    ] = None,
    plot: Annotated[
        bool, typer.Option("--plot", help="Also draw results.png: each task before and after, changes with CIs.")
    ] = False,
) -> None:
    """Score the baseline and the intervened model on the same items and compare them."""
    if (method is None) == (config is None):
        raise _fail("give exactly one of --method NAME or --config FILE (see `intervene methods`)")
    if uncalibrated and config is not None:
        raise _fail("--uncalibrated goes with --method: it runs the method's defaults instead of a config")
    params = _params(param or [])
    from intervene.evals.model import shipped_config

    if method and not uncalibrated and (shipped := shipped_config(model, method)):
        overrides = f", with --param {', '.join(param)} over its parameters" if params else ""
        typer.echo(f"using the {method} config calibrated for {model} that ships with intervene{overrides}: {shipped}",
                   err=True)  # fmt: skip
        typer.echo("(--uncalibrated runs the method's own defaults, --config another config)", err=True)
        method, config = None, shipped
    _check_dtype(dtype)
    if device is not None and device_map is not None:
        raise _fail("give --device or --device-map, not both (a device map places the model itself)")
    if lm_eval_tasks := _lm_eval_tasks(tasks, include_path):
        refused = {"--resume": resume, "--plot": plot, "--device-map": device_map, "--split": split != "test"}
        refused |= {"--output-type": output_type, "--doc-to-text": doc_to_text, "--doc-to-choice": doc_to_choice}
        refused |= {"--doc-to-target": doc_to_target, "--doc-to-image": doc_to_image, "--image-root": image_root}
        if given := [flag for flag, value in refused.items() if value]:
            raise _fail(f"{', '.join(given)}: not for lm-eval tasks, whose splits and fields lm-eval reads from them")
        return _evaluate_lm_eval(
            lm_eval_tasks, model=model, method=method, config=config, params=params, limit=limit,
            batch_size=batch_size, device=device, dtype=dtype, add_bos_token=add_bos_token, seed=seed,
            output_path=output_path,
        )  # fmt: skip

    import torch
    from accelerate.utils import broadcast_object_list

    import intervene
    from intervene.evals import report, runner
    from intervene.evals.inspect import require_matplotlib
    from intervene.evals.model import is_vision_language, smoke_test_warning, starts_with_bos
    from intervene.evals.tasks import TaskError, builtin_tasks, check_modality
    from intervene.interventions import method_class

    _check_device(device)
    if resume is not None:  # read before the model loads: a folder that is no run fails at once
        try:
            earlier = json.loads((resume / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            earlier = None
        if not isinstance(earlier, dict):
            raise _fail(f"--resume {resume}: no run.json of an intervene eval there; give the folder of that run")
    saved = _read_config(config) if config else None
    fields = {"output_type": output_type, "doc_to_text": doc_to_text, "doc_to_choice": doc_to_choice}
    fields |= {"doc_to_target": doc_to_target, "doc_to_image": doc_to_image, "image_root": image_root}
    try:
        vision = is_vision_language(model)
        default = [name for name, task in builtin_tasks().items() if task.needs_images == vision]
        chosen = _resolve_tasks(tasks, fields, default)
        check_modality(chosen, model, vision)
        for task in chosen:  # fail on a broken task or a missing image before loading anything heavy
            task.items(split, limit)
        spec = intervene.load_config(config) if config else method
        if config:
            _check_not_calibrated_on(config, saved, chosen, split)
        if method:
            method_class(method).from_dict(params)  # an unknown method or a bad value fails before the model loads
        if plot:
            require_matplotlib()
        # Every check above fails alike on every process, before the processes first wait for each other here.
        ranks = runner.processes(device)
        if ranks.num_processes > 1 and device_map is not None:
            raise ValueError("--device-map spreads one model over the devices; use it in a single process")
        if ranks.num_processes > 1 and device is None:
            device = str(ranks.device)  # each process its own GPU (or the CPU)
        if resume is None:
            _make_folder(output_path)
        torch.manual_seed(seed)
        loaded, tokenizer = intervene.load_model(
            model, dtype=dtype, device=device, device_map=device_map, add_bos_token=add_bos_token
        )
        handle = intervene.apply(loaded, spec, **params)
    except (TaskError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted before any item was scored; nothing was written", err=True)
        raise typer.Exit(130) from None

    settings = {
        "model": model, "intervention": {k: handle.to_dict()[k] for k in ("method", "params")},
        "tasks": [t.name for t in chosen], "task_settings": {t.name: _settings(t) for t in chosen}, "split": split,
        "limit": limit, "batch_size": batch_size, "seed": seed, "dtype": str(loaded.dtype).removeprefix("torch."),
        "add_bos_token": starts_with_bos(tokenizer),
    }  # fmt: skip
    settings = json.loads(json.dumps(settings))  # as it reads back from the file
    if resume is not None:
        run_dir = resume
        changed = [key for key in settings if earlier.get(key) != settings[key]]
        if changed:
            handle.remove()
            differences = "; ".join(
                f"{key} {json.dumps(earlier.get(key))} there, {json.dumps(settings[key])} now" for key in changed
            )
            raise _fail(f"--resume {run_dir}: that run had other settings ({differences}); repeat its exact arguments")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    if resume is None:  # rank 0 makes the run folder, named by its clock, for every process to write to
        (run_dir,) = broadcast_object_list([_new_run_dir(output_path, stamp) if ranks.is_main_process else None])
        if ranks.is_main_process:  # the others write only once the runner has waited for this one
            report.write_atomic(run_dir / "run.json", json.dumps(settings, indent=2) + "\n")
    try:
        results, timing = runner.evaluate(
            loaded,
            tokenizer,
            handle,
            chosen,
            samples_dir=run_dir,
            split=split,
            limit=limit,
            batch_size=batch_size,
            seed=seed,
            resume=resume is not None,
        )
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: the items scored so far are logged in {run_dir}/samples_*.jsonl; "
                   f"run the same command with --resume {run_dir} to continue", err=True)  # fmt: skip
        raise typer.Exit(130) from None
    except (TaskError, ValueError) as error:
        raise _fail(str(error)) from None
    finally:
        handle.remove()
    if not ranks.is_main_process:
        return  # rank 0 reports for every process

    warning = smoke_test_warning(loaded)
    document = {
        "results": results,
        "smoke_test": warning,
        "config": {
            "model": model,
            "tasks": [t.name for t in chosen],
            "task_settings": {t.name: _settings(t) for t in chosen},
            "split": split,
            "limit": limit,
            "batch_size": batch_size,
            "device": str(loaded.device),
            "device_map": device_map,
            "processes": ranks.num_processes,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "add_bos_token": starts_with_bos(tokenizer),
        },
        "intervention": _intervention_record(handle, config),
        "versions": report.versions(),
        "seed": seed,
        "timing": timing,
        "date": stamp,
    }
    report.write_atomic(run_dir / "results.json", json.dumps(document, indent=2) + "\n")
    typer.echo(f"\n{_heading(model, handle, config, params)}\n")
    typer.echo(report.markdown(results, timing, warning))
    typer.echo(f"\nresults: {run_dir / 'results.json'}")
    if plot:
        from intervene.evals.plot import plot_results

        title = f"{model} · {handle.method}" + (" · SMOKE TEST: random weights, scores mean nothing" if warning else "")
        plot_results(results, run_dir / "results.png", title=title)
        typer.echo(f"plot: {run_dir / 'results.png'}")


def _lm_eval_tasks(tasks: str | None, include_path: Path | None):
    """`(names, task manager)` when --tasks are lm-eval's (under --include-path, or in its registry); None when
    they are intervene's own: built-in names and task files."""
    from intervene.evals.tasks import FORMATS, builtin_tasks

    specs = [spec.strip() for spec in tasks.split(",") if spec.strip()] if tasks else []
    ours = (*FORMATS, ".yaml", ".yml")  # task files
    theirs = [spec for spec in specs if spec not in builtin_tasks() and Path(spec).suffix not in ours]
    if include_path is None and not theirs:
        return None
    try:
        from intervene.evals import lm_eval_tasks
    except ImportError:
        if include_path is None:
            return None  # intervene's own task resolution names the unknown task
        raise _fail("--include-path: lm-eval tasks need lm-eval: pip install 'intervene[lm-eval]'") from None
    if not theirs:
        raise _fail("--include-path goes with --tasks naming the lm-eval tasks to run")
    if include_path is not None and not include_path.is_dir():
        raise _fail(f"--include-path {include_path}: not a folder; give the folder of your lm-eval task YAMLs")
    manager = lm_eval_tasks.task_manager(str(include_path) if include_path else None)
    if unknown := [spec for spec in theirs if not lm_eval_tasks.is_lm_eval_task(spec, manager)]:
        under = f" (nor under --include-path {include_path})" if include_path else ""
        raise _fail(
            f"unknown task {', '.join(map(repr, unknown))}: not a built-in task ({', '.join(builtin_tasks())}), "
            f"a task file ({', '.join(ours)}), or a task lm-eval knows{under}"
        )
    if len(theirs) < len(specs):
        raise _fail(f"--tasks {tasks}: run intervene's own tasks and lm-eval's ({', '.join(theirs)}) separately")
    return specs, manager


def _evaluate_lm_eval(tasks, *, model, method, config, params, limit, batch_size, device, dtype, add_bos_token, seed,
                      output_path) -> None:  # fmt: skip
    """The paired run of lm-eval tasks: lm-eval scores them twice on one loaded model, intervention off and on."""
    from intervene.evals import lm_eval_tasks, report
    from intervene.evals.lm_eval_model import InterveneLM

    names, manager = tasks
    try:
        _make_folder(output_path)
        lm = InterveneLM(
            pretrained=model, method=method, config=str(config) if config else None, dtype=dtype,
            add_bos_token=add_bos_token, device=device, batch_size=batch_size, **params,
        )  # fmt: skip
        run_dir = _new_run_dir(output_path, datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S"))
        results, timing = lm_eval_tasks.paired(lm, names, manager, limit=limit, seed=seed, out=run_dir)
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from None
    handle = lm.intervention
    document = {
        "results": results,
        "config": {
            "model": model, "harness": "lm-eval", "tasks": names, "limit": limit, "batch_size": batch_size,
            "device": str(lm.model.device), "dtype": str(lm.model.dtype).removeprefix("torch."),
            "add_bos_token": add_bos_token,
        },
        "intervention": _intervention_record(handle, config),
        "versions": report.versions(),
        "seed": seed,
        "timing": timing,
        "date": run_dir.name,
    }  # fmt: skip
    report.write_atomic(run_dir / "results.json", json.dumps(document, indent=2) + "\n")
    typer.echo(f"\n{_heading(model, handle, config, params)} · lm-eval\n")
    typer.echo(report.markdown(results, timing))
    typer.echo(f"\nresults: {run_dir / 'results.json'} (lm-eval's own: lm_eval_baseline.json, lm_eval_intervened.json)")


def _intervention_record(handle, config: Path | None) -> dict:
    """The resolved intervention as results.json keeps it, with the config file it came from, if any."""
    return {**handle.to_dict(), "config_file": str(config) if config else None}


def _heading(model: str, handle, config: Path | None, params: dict) -> str:
    """The line above the results table: the model, the method, the config file that ran and its parameters."""
    source = f" (config {config}{', --param over it' if params else ''})" if config else ""
    return f"{model} · {handle.method}{source} {json.dumps(handle.config.to_dict())}"


def _settings(task) -> dict:
    """What decides a task's numbers besides its data: the prompt, the scorer and the decoding."""
    settings = {"output_type": task.output_type, "doc_to_text": task.doc_to_text}
    if task.output_type in ("multiple_choice", "classification"):
        settings["target_delimiter"] = task.target_delimiter  # joins the prompt and each choice
    if task.output_type in ("generate_until", "pope", "chair"):
        settings["generation_kwargs"] = {"do_sample": False, **task.generation_kwargs}
    return settings


@app.command()
def calibrate(
    method: Annotated[
        str,
        typer.Option(
            help="act or zerotuning (or any registered method with `heads`); prune fits its positional trend."
        ),
    ],
    model: Annotated[
        str, typer.Option(help="Built-in model name, local checkpoint directory or hub id.")
    ] = "smollm2-135m",
    param: Annotated[list[str] | None, typer.Option(help="Method parameter used while profiling, key=value.")] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="Comma-separated tasks (default: the built-in tasks of the model's kind with this split)."),
    ] = None,
    split: Annotated[str, typer.Option(help="The split to calibrate on; never the one you report.")] = "calib",
    granularity: Annotated[str, typer.Option(help="Candidates: layer, head_index (across layers) or head.")] = "layer",
    select: Annotated[str, typer.Option(help="min_delta=D, top_k=K or top_fraction=F.")] = "min_delta=0.0",
    gammas: Annotated[
        str | None, typer.Option(help="zerotuning: comma-separated gammas tried on the selection.")
    ] = None,
    gamma_by: Annotated[
        str, typer.Option(help="Pick the gamma by calib accuracy or by lowest entropy (no labels).")
    ] = ("accuracy"),
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N items of each task.")] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "--batch_size", min=1, help="Items per forward pass.")
    ] = 16,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    device_map: Annotated[
        str | None,
        typer.Option(
            "--device-map",
            "--device_map",
            help="auto, balanced, balanced_low_0 or sequential: spread a model too large for one device.",
        ),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help=DTYPE_HELP)] = None,
    add_bos_token: Annotated[bool, typer.Option("--add-bos-token", "--add_bos_token", help=BOS_HELP)] = False,
    output_path: Annotated[
        Path,
        typer.Option("--output-path", "--output_path", help="Folder for config.json and the resumable profile log."),
    ] = Path("intervene_calibration"),
    seed: Annotated[int, typer.Option(help="Recorded with the artifact.")] = 1234,
) -> None:
    """Find the heads (and strength) where an intervention helps on a calibration split; save a config."""
    if split == "test":
        raise _fail("calibrating on the test split would tune on the numbers you report; use --split calib")
    rule, _, value = select.partition("=")
    try:
        value = float(value)
        gamma_grid = [float(g) for g in gammas.split(",")] if gammas else []
    except ValueError:
        raise _fail(f"--select {select!r} / --gammas {gammas!r}: give numbers, e.g. top_k=5, 0.5,2,3") from None
    if device is not None and device_map is not None:
        raise _fail("give --device or --device-map, not both (a device map places the model itself)")
    params = _params(param or [])

    import intervene
    from intervene.evals import calibrate as engine
    from intervene.evals import runner
    from intervene.evals.model import is_vision_language, smoke_test_warning
    from intervene.evals.tasks import TaskError, builtin_tasks, check_modality
    from intervene.interventions import method_class

    _check_device(device)
    _check_dtype(dtype)
    try:
        if rule not in engine.RULES or granularity not in engine.GRANULARITIES:
            raise ValueError(
                f"--select takes {', '.join(engine.RULES)} and --granularity {', '.join(engine.GRANULARITIES)}"
            )
        vision = is_vision_language(model)
        default = [name for name, t in builtin_tasks().items() if t.needs_images == vision and split in t.data_files]
        chosen = _resolve_tasks(tasks, {}, default)
        check_modality(chosen, model, vision)
        for task in chosen:
            task.items(split, 1)
        if method == "prune" and not vision:
            raise ValueError(f"prune acts on image tokens and {model} is a text-only model; pass a VLM with --model")
        method_class(method).from_dict(params)
        if runner.processes(device).num_processes > 1:
            raise ValueError("calibrate runs in one process (each would profile every candidate): run it unlaunched")
        _make_folder(output_path)
        loaded, tokenizer = intervene.load_model(
            model, dtype=dtype, device=device, device_map=device_map, add_bos_token=add_bos_token
        )
        say = lambda text: typer.echo(text, err=True)
        if method == "prune":  # no heads to profile: fit the positional trend its debiasing divides out
            artifact = engine.fit_prune_trend(
                loaded, tokenizer, params, chosen, split=split, limit=limit, batch_size=batch_size,
                output=output_path, say=say,
            )  # fmt: skip
        else:
            artifact = engine.calibrate(
                loaded, tokenizer, method, params, chosen, granularity=granularity, rule=rule, value=value,
                gammas=gamma_grid, gamma_by=gamma_by, split=split, limit=limit, batch_size=batch_size, seed=seed,
                output=output_path, say=say,
            )  # fmt: skip
    except (TaskError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: run the same command again to resume from {output_path}/profile.jsonl", err=True)
        raise typer.Exit(130) from None
    if warning := smoke_test_warning(loaded):
        typer.echo(warning)
    found = artifact["calibration"]
    if method == "prune":
        trend = found["trend"]
        typer.echo(f"positional trend: mu {trend['mu']:.4g}, sigma {trend['sigma']:.3f} over {found['prompts']} "
                   f"prompts; params {json.dumps(artifact['params'])}")  # fmt: skip
    else:
        typer.echo(f"baseline objective {found['baseline']['objective']:.4f}; selected {len(found['selected'])} of "
                   f"{len(found['profile'])} candidates: {', '.join(found['selected']) or 'none helped'}")  # fmt: skip
        if not found["selected"]:
            typer.echo("warning: no candidate raised the objective, so this config edits no head and changes "
                       "nothing; try more items (--limit), another --select or other --param", err=True)  # fmt: skip
        typer.echo(f"with the selection: {found['result']['objective']:.4f}; params {json.dumps(artifact['params'])}")
    typer.echo(
        f"config: {output_path / 'config.json'}  (replay: intervene eval --config {output_path / 'config.json'})"
    )


@app.command("inspect")
def inspect_attention(
    prompt: Annotated[str, typer.Option(help="The text to look at (for a VLM: the question about --image).")],
    model: Annotated[
        str, typer.Option(help="Built-in model name, local checkpoint directory or hub id.")
    ] = "smollm2-135m",
    method: Annotated[str | None, typer.Option(help="Also show the attention under this intervention.")] = None,
    param: Annotated[list[str] | None, typer.Option(help="Method parameter as key=value; repeatable.")] = None,
    config: Annotated[Path | None, typer.Option(help="A saved intervention config (JSON) instead of --method.")] = None,
    image: Annotated[Path | None, typer.Option(help="The image, for a vision-language model.")] = None,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers to draw (default: four spread over the edited ones).")
    ] = None,
    heads: Annotated[
        str | None, typer.Option(help="Comma-separated query heads whose mean is drawn (default: all heads).")
    ] = None,
    threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Mean attention above which a later key is a hidden sink (ACT).")
    ] = 0.1,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help=DTYPE_HELP)] = None,
    add_bos_token: Annotated[bool, typer.Option("--add-bos-token", "--add_bos_token", help=BOS_HELP)] = False,
    output_path: Annotated[
        Path, typer.Option("--output-path", "--output_path", help="Folder for the PNGs, summary.txt and sinks.json.")
    ] = Path("intervene_inspect"),
) -> None:
    """Sink statistics and attention maps of one prompt, before and after an intervention."""
    if method is not None and config is not None:
        raise _fail("give at most one of --method NAME or --config FILE")
    params = _params(param or [])
    try:
        chosen_layers = [int(layer) for layer in layers.split(",")] if layers else None
        chosen_heads = [int(head) for head in heads.split(",")] if heads else None
    except ValueError:
        raise _fail(f"--layers {layers!r} / --heads {heads!r}: give comma-separated numbers, e.g. 0,5,10") from None
    _check_dtype(dtype)

    import intervene
    from intervene.evals.inspect import inspect, require_matplotlib
    from intervene.evals.model import shipped_config, smoke_test_warning
    from intervene.interventions import method_class

    _check_device(device)
    if config:
        _read_config(config)
    handle = None
    try:
        require_matplotlib()
        if method and not params and (shipped := shipped_config(model, method)):
            typer.echo(f"using the {method} config calibrated for {model} that ships with intervene: {shipped}",
                       err=True)  # fmt: skip
            method, config = None, shipped
        if method:
            method_class(method).from_dict(params)  # an unknown method or a bad value fails before the model loads
        if image is not None and not image.is_file():
            raise ValueError(f"--image {image}: no such file")
        _make_folder(output_path)
        loaded, processor = intervene.load_model(model, dtype=dtype, device=device, add_bos_token=add_bos_token)
        if method or config:
            handle = intervene.apply(loaded, intervene.load_config(config) if config else method, **params)
        summary, written = inspect(
            loaded, processor, prompt, handle=handle, image=image, layers=chosen_layers, heads=chosen_heads,
            threshold=threshold, output=output_path,
        )  # fmt: skip
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted before inspect finished", err=True)
        raise typer.Exit(130) from None
    finally:
        if handle is not None:
            handle.remove()
    if warning := smoke_test_warning(loaded):
        typer.echo(warning)
    typer.echo(summary)
    typer.echo(f"\nwritten to {output_path}: {', '.join(path.name for path in written)}")


@app.command()
def methods() -> None:
    """List the registered interventions."""
    import intervene

    for name, description in intervene.methods().items():
        typer.echo(f"{name:<12} {description}")


@app.command()
def tasks() -> None:
    """List the built-in tasks with their splits."""
    from intervene.evals.tasks import builtin_tasks

    for name, task in builtin_tasks().items():
        sizes = ", ".join(f"{split} {Path(path).read_text().count(chr(10))}" for split, path in task.data_files.items())
        typer.echo(f"{name:<16} {task.output_type:<16} {sizes:<20} {task.description}")


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def lm_eval_command(context: typer.Context) -> None:
    """lm-eval's own command line, flags as lm-eval spells them, with the `intervene` model registered:
    intervene lm-eval --model intervene --model_args pretrained=smollm2-135m,method=act --tasks ..."""
    import sys

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise _fail("lm-eval is not installed: pip install 'intervene[lm-eval]'") from None
    import intervene.evals.lm_eval_model  # noqa: F401  (registers the model class with lm-eval)

    sys.argv = ["lm-eval", *context.args]  # lm-eval parses sys.argv itself
    cli_evaluate()


def main() -> None:
    app()


if __name__ == "__main__":  # python -m intervene.cli, as accelerate launch -m runs it
    main()
