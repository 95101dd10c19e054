"""Tasks from local files: the built-in ones under `evals/data/`, a user's JSONL (or CSV / Parquet /
Arrow) file, or a small lm-eval-style YAML next to one.

Every task becomes a list of `Item`s. A record of `query` / `choices` / `gold` is a multiple-choice
task as it stands; other layouts say how to read a record with `doc_to_text`, `doc_to_choice` and
`doc_to_target` (a field name, a Jinja template such as "{{question}}", or a YAML list of templates).
Files load through `datasets`, offline; a malformed record is reported with its file and line.
"""

from __future__ import annotations

import ast
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
OUTPUT_TYPES = ("multiple_choice", "classification", "generate_until")
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


class TaskError(ValueError):
    """A task that cannot be loaded; the message names the file, the record and the problem."""


@dataclass(frozen=True)
class Item:
    query: str
    choices: list[str] | None = None  # multiple_choice / classification
    gold: int | None = None
    answers: list[str] | None = None  # generate_until: accepted answers, [] = none exists (abstain)


@dataclass(frozen=True)
class Task:
    name: str
    output_type: str = "multiple_choice"
    data_files: dict[str, str] = field(default_factory=dict)  # split -> path
    doc_to_text: Any = "query"
    doc_to_choice: Any = "choices"
    doc_to_target: Any = "gold"
    target_delimiter: str = " "
    generation_kwargs: dict = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if self.output_type not in OUTPUT_TYPES:
            raise TaskError(
                f"task {self.name!r}: output_type {self.output_type!r} is not one of {', '.join(OUTPUT_TYPES)}"
            )

    def split(self, preferred: str = "test") -> str:
        if preferred in self.data_files:
            return preferred
        if len(self.data_files) == 1:
            return next(iter(self.data_files))
        raise TaskError(f"task {self.name!r} has no split {preferred!r}; it has: {', '.join(self.data_files)}")

    def items(self, split: str = "test", limit: int | None = None) -> list[Item]:
        path = Path(self.data_files[self.split(split)])
        records, lines = _read(path)
        if limit is not None:
            records, lines = records[:limit], lines[:limit]
        items = [self._item(record, f"{path}:{line}") for record, line in zip(records, lines, strict=True)]
        if not items:
            raise TaskError(f"task {self.name!r}: {path} has no records")
        return items

    def _item(self, doc: dict, where: str) -> Item:
        query = _resolve(self.doc_to_text, doc, where)
        if not isinstance(query, str):
            raise TaskError(f"{where}: the query must be text, got {query!r}")
        target = _resolve(self.doc_to_target, doc, where)
        if self.output_type == "generate_until":
            answers = [target] if isinstance(target, str) else target
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise TaskError(f"{where}: the target must be an answer or a list of answers, got {target!r}")
            return Item(query=query, answers=answers)
        choices = _resolve(self.doc_to_choice, doc, where)
        if isinstance(choices, str):
            choices = _literal(choices, where)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{where}: choices must be a list of at least two strings, got {choices!r}")
        if isinstance(target, str):
            target = choices.index(target) if target in choices else _literal(target, where)
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(choices):
            raise TaskError(f"{where}: gold must index one of the {len(choices)} choices, got {target!r}")
        return Item(query=query, choices=choices, gold=target)


def builtin_tasks() -> dict[str, Task]:
    return {path.stem: load_yaml(path) for path in sorted(DATA.glob("*.yaml"))}


def resolve_task(spec: str, **overrides) -> Task:
    """A built-in task name, a YAML task file, or a data file (with `doc_to_*` / `output_type` overrides)."""
    builtin = builtin_tasks()
    if spec in builtin:
        return builtin[spec]
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        _exists(path, builtin)
        return load_yaml(path, **overrides)
    if path.suffix in FORMATS:
        _exists(path, builtin)
        given = {k: v for k, v in overrides.items() if v is not None}
        return Task(name=path.stem, data_files={"test": str(path)}, **given)
    raise TaskError(
        f"unknown task {spec!r}: built-in tasks are {', '.join(builtin)}; "
        f"a file task ends in {', '.join(FORMATS)} or .yaml"
    )


def load_yaml(path: Path, **overrides) -> Task:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TaskError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a task file is a mapping of task fields")
    known = {"task", "dataset_path", "data_files", "test_split", "output_type", "doc_to_text", "doc_to_choice"}
    known |= {"doc_to_target", "target_delimiter", "generation_kwargs", "description", "metric_list"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise TaskError(f"{path}: unknown task field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
    files = spec.get("data_files") or spec.get("dataset_path")
    if isinstance(files, str):
        files = {spec.get("test_split", "test"): files}
    if not isinstance(files, dict) or not files:
        raise TaskError(f"{path}: give the data as data_files: {{test: file.jsonl}} (relative to the YAML)")
    fields = {k: spec[k] for k in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target") if k in spec}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return Task(
        name=spec.get("task", path.stem),
        data_files={split: str(path.parent / f) for split, f in files.items()},
        target_delimiter=spec.get("target_delimiter", " "),
        generation_kwargs=spec.get("generation_kwargs", {}),
        description=spec.get("description", ""),
        **fields,
    )


def _exists(path: Path, builtin: dict) -> None:
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist (built-in tasks: {', '.join(builtin)})")


def _read(path: Path) -> tuple[list[dict], list[int]]:
    """Records and their line numbers (record numbers for non-line formats), loaded through `datasets`."""
    if not path.is_file():
        raise TaskError(f"task data file {path} does not exist")
    lines = None
    if path.suffix == ".jsonl":
        lines = _check_jsonl(path)
        if not lines:
            raise TaskError(f"{path} has no records")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        table = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors in many types
        raise TaskError(f"{path}: cannot be read as {path.suffix[1:]} ({error})") from None
    records = table.to_list()
    return records, lines or list(range(1, len(records) + 1))


def _check_jsonl(path: Path) -> list[int]:
    """Line numbers of the records; a line that is not a JSON object is an error naming it."""
    numbers = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
            numbers.append(number)
    return numbers


def _resolve(spec, doc: dict, where: str):
    if isinstance(spec, list):
        return [_resolve(s, doc, where) for s in spec]
    if isinstance(spec, int):
        return spec
    if spec in doc:
        return doc[spec]
    if "{{" in spec or "{%" in spec:
        import jinja2

        try:
            return _template(spec).render(**doc)
        except jinja2.TemplateError as error:
            raise TaskError(f"{where}: template {spec!r} failed: {error}") from None
    raise TaskError(f"{where}: the record has no field {spec!r}; its fields are: {', '.join(doc)}")


@functools.cache
def _template(spec: str):
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(spec)


def _literal(text: str, where: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise TaskError(f"{where}: {text!r} is neither a choice nor a Python literal") from None
