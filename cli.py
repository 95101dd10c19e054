"""The `intervene` command line. Heavy imports happen inside commands so that `--help` is instant."""

from __future__ import annotations

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


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


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
    param: Annotated[list[str] | None, typer.Option(help="Method parameter as key=value; repeatable.")] = None,
    config: Annotated[Path | None, typer.Option(help="A saved intervention config (JSON) instead of --method.")] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="Comma-separated built-in task names or task files (default: all built-in tasks)."),
    ] = None,
    split: Annotated[str, typer.Option(help="Which split of each task to score.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N items of each task.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Items per forward pass.")] = 16,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoint's).")] = None,
    output_path: Annotated[Path, typer.Option(help="Folder for the results JSON and per-sample logs.")] = Path(
        "intervene_results"
    ),
    seed: Annotated[int, typer.Option(help="Seed for the bootstrap (decoding is greedy).")] = 1234,
    output_type: Annotated[
        str | None, typer.Option(help="For a plain data file: multiple_choice, classification or generate_until.")
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
) -> None:
    """Score the baseline and the intervened model on the same items and compare them."""
    if (method is None) == (config is None):
        raise _fail("give exactly one of --method NAME or --config FILE (see `intervene methods`)")
    params = _params(param or [])
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise _fail(f"--dtype {dtype!r} is not one of float32, bfloat16, float16")

    import torch

    import intervene
    from intervene.evals import report, runner
    from intervene.evals.tasks import TaskError, builtin_tasks, resolve_task
    from intervene.interventions import method_class

    fields = {"output_type": output_type, "doc_to_text": doc_to_text}
    fields |= {"doc_to_choice": doc_to_choice, "doc_to_target": doc_to_target}
    try:
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else list(builtin_tasks())
        chosen = [resolve_task(name, **fields) for name in names]
        for task in chosen:  # fail on a broken task before loading anything heavy
            task.items(split, 1)
        spec = intervene.load_config(config) if config else method
        if method:
            method_class(method).from_dict(params)  # an unknown method or a bad value fails before the model loads
        torch.manual_seed(seed)
        loaded, tokenizer = intervene.load_model(model, dtype=dtype, device=device)
        handle = intervene.apply(loaded, spec, **params)
    except (TaskError, ValueError, OSError, json.JSONDecodeError) as error:
        raise _fail(str(error)) from None

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    run_dir = output_path / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
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
        )
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: the items scored so far are logged in {run_dir}/samples_*.jsonl", err=True)
        raise typer.Exit(130) from None
    except TaskError as error:
        raise _fail(str(error)) from None
    finally:
        handle.remove()

    document = {
        "results": results,
        "config": {
            "model": model,
            "tasks": [t.name for t in chosen],
            "split": split,
            "limit": limit,
            "batch_size": batch_size,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
        },
        "intervention": handle.to_dict(),
        "versions": report.versions(),
        "seed": seed,
        "timing": timing,
        "date": stamp,
    }
    (run_dir / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    typer.echo(f"\n{model} · {handle.method} {json.dumps(handle.config.to_dict())}\n")
    typer.echo(report.markdown(results, timing))
    typer.echo(f"\nresults: {run_dir / 'results.json'}")


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


def main() -> None:
    app()
