"""The `intervene` command line. Heavy imports happen inside commands so that `--help` is instant."""

from __future__ import annotations

import json
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


def _checked(check, *args):
    """Run one of the evaluator's checks; its error becomes the command's error."""
    try:
        return check(*args)
    except ValueError as error:
        raise _fail(str(error)) from None


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
        str | None,
        typer.Option(help="Built-in model name, local checkpoint directory or hub id [default: smollm2-135m]"),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(help="Method parameter as key=value, overriding the config's if one runs; repeatable."),
    ] = None,
    model_args: Annotated[
        str | None,
        typer.Option(
            "--model-args",
            "--model_args",
            help="lm-eval's spelling of the above: pretrained=NAME,method=act,beta=0.4 (also config, dtype, "
            "add_bos_token; other keys are method parameters).",
        ),
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
    num_fewshot: Annotated[
        int | None,
        typer.Option(
            "--num-fewshot",
            "--num_fewshot",
            min=0,
            help="Few-shot examples before each prompt, over each task's own (as lm-eval's).",
        ),
    ] = None,
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
        Path,
        typer.Option(
            "--output-path",
            "--output_path",
            help="Folder for the run's folder (results.json, per-sample logs), or a .json file for the results.",
        ),
    ] = Path("intervene_results"),
    log_samples: Annotated[
        bool,
        typer.Option("--log-samples", "--log_samples", help="lm-eval's flag, accepted: every run logs its samples."),
    ] = False,
    seed: Annotated[
        int, typer.Option(help="Seed for the bootstrap, and for sampling where a task samples (each batch seeded).")
    ] = 1234,
    seeds: Annotated[
        int,
        typer.Option(
            help="Run each task that samples this many times, with the seeds --seed, --seed + 1, ...: its scores "
            "pool the runs, and each seed's are listed. Greedy tasks run once."
        ),
    ] = 1,
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
    from intervene.evals.evaluator import EvalSpec, Interrupted, run
    from intervene.evals.tasks import TaskError

    fields = {"output_type": output_type, "doc_to_text": doc_to_text, "doc_to_choice": doc_to_choice}
    fields |= {"doc_to_target": doc_to_target, "doc_to_image": doc_to_image, "image_root": image_root}
    chosen = {"model": model, "method": method, "config": config, "dtype": dtype, "add_bos_token": add_bos_token}
    chosen |= _model_args(model_args or "", chosen)
    spec = EvalSpec(
        model=chosen["model"] or "smollm2-135m", method=chosen["method"], config=chosen["config"],
        params=_params(param or []) | chosen["params"], uncalibrated=uncalibrated,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None, include_path=include_path,
        split=split, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, device=device,
        device_map=device_map, dtype=chosen["dtype"], add_bos_token=chosen["add_bos_token"], output_path=output_path,
        seed=seed, seeds=seeds, file_fields={name: value for name, value in fields.items() if value is not None},
        resume=resume, plot=plot,
    )  # fmt: skip
    try:
        document = run(spec, say=lambda text: typer.echo(text, err=True))
    except Interrupted as stop:
        typer.echo(f"\n{stop}", err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted before any item was scored; nothing was written", err=True)
        raise typer.Exit(130) from None
    except (TaskError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if not document:
        return  # a process of several, not the first: that one reports for every process
    from intervene.evals import report

    lm_eval = document["config"].get("harness") == "lm-eval"
    typer.echo(f"\n{_heading(spec.model, document['intervention'], spec.params)}{' · lm-eval' if lm_eval else ''}\n")
    typer.echo(report.markdown(document["results"], document["timing"], document.get("smoke_test")))
    results = document["config"]["output_path"]
    typer.echo(
        f"\nresults: {results}"
        + (" (lm-eval's own: lm_eval_baseline.json, lm_eval_intervened.json)" if lm_eval else "")
    )
    if plot:
        typer.echo(f"plot: {Path(results).with_suffix('.png')}")


def _model_args(text: str, options: dict) -> dict:
    """lm-eval's `--model_args k=v,...` as the options they spell (`pretrained` is --model), with the remaining keys
    under "params"; a key also given as its own option is an error naming both."""
    found = {"params": {}}
    for key, value in _params([pair for pair in text.split(",") if pair.strip()]).items():
        key = "model" if key == "pretrained" else key
        if isinstance(value, str) and value.lower() in ("true", "false"):  # lm-eval's spelling of booleans
            value = value.lower() == "true"
        if key not in options:
            found["params"][key] = value
        elif options[key]:
            raise _fail(f"--model_args {key if key != 'model' else 'pretrained'}={value} and --{key.replace('_', '-')} "
                        f"{options[key]} both say it; give one")  # fmt: skip
        else:
            found[key] = value
    return found


def _heading(model: str, intervention: dict, params: dict) -> str:
    """The line above the results table: the model, the method, the config file that ran and its parameters."""
    config = intervention["config_file"]
    source = f" (config {config}{', --param over it' if params else ''})" if config else ""
    return f"{model} · {intervention['method']}{source} {json.dumps(intervention['params'])}"


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
    select: Annotated[
        str,
        typer.Option(
            help="min_delta=D, top_k=K, top_fraction=F, or no_regress=T: only candidates, and unions of them, under "
            "which no calibration task loses more than T."
        ),
    ] = "min_delta=0.0",
    objective: Annotated[
        str,
        typer.Option(help="What a candidate gains: mean (the change of the tasks' mean) or worst (its worst task's)."),
    ] = "mean",
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
    params = _params(param or [])

    import intervene
    from intervene.evals import calibrate as engine
    from intervene.evals import runner
    from intervene.evals.evaluator import check_placement, make_folder, resolve_tasks
    from intervene.evals.model import is_vision_language, smoke_test_warning
    from intervene.evals.tasks import TaskError, builtin_tasks, check_modality
    from intervene.interventions import method_class

    _checked(check_placement, device, device_map, dtype)
    try:
        if rule not in engine.RULES or granularity not in engine.GRANULARITIES or objective not in engine.OBJECTIVES:
            raise ValueError(
                f"--select takes {', '.join(engine.RULES)}, --granularity {', '.join(engine.GRANULARITIES)} and "
                f"--objective {', '.join(engine.OBJECTIVES)}"
            )
        vision = is_vision_language(model)
        default = [name for name, t in builtin_tasks().items() if t.needs_images == vision and split in t.data_files]
        chosen = resolve_tasks([t.strip() for t in tasks.split(",") if t.strip()] if tasks else None, {}, default)
        check_modality(chosen, model, vision)
        for task in chosen:
            task.items(split, 1)
        if method == "prune" and not vision:
            raise ValueError(f"prune acts on image tokens and {model} is a text-only model; pass a VLM with --model")
        method_class(method).from_dict(params)
        if runner.processes(device).num_processes > 1:
            raise ValueError("calibrate runs in one process (each would profile every candidate): run it unlaunched")
        make_folder(output_path)
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
                objective=objective, gammas=gamma_grid, gamma_by=gamma_by, split=split, limit=limit,
                batch_size=batch_size, seed=seed, output=output_path, say=say,
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

    import intervene
    from intervene.evals.evaluator import check_placement, make_folder, read_config
    from intervene.evals.inspect import inspect, require_matplotlib
    from intervene.evals.model import shipped_config, smoke_test_warning
    from intervene.interventions import method_class

    _checked(check_placement, device, None, dtype)
    if config:
        _checked(read_config, config)
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
        make_folder(output_path)
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
        typer.echo(f"{name:<16} {task.output_type:<16} {sizes:<20} {task.summary}")


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
