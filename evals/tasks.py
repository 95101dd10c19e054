"""Tasks from local files: the built-in ones under `evals/data/`, a user's JSONL (or CSV / Parquet /
Arrow) file, or a small lm-eval-style YAML next to one.

Every task becomes a list of `Item`s. A record of `query` / `choices` / `gold` is a multiple-choice
task as it stands; other layouts say how to read a record with `doc_to_text`, `doc_to_choice` and
`doc_to_target` (a field name, or a Jinja template: any text with "{{ }}" or a space, such as
"{{question}} Answer with one word."; or a YAML list of those). JSONL files are read line by line, other
formats through `datasets`, offline; a malformed record is reported with its file and line.

Image tasks (`pope`, `chair`, or any task given `doc_to_image`) read an image path from each record
(field `image` by default), relative to `image_root` or else to the data file's folder; every image is
checked when the items are read, so a missing one fails before a model loads. `pope` reads the public
POPE question files (`{"question_id", "image", "text", "label"}`) as they stand; `chair` reads records
with an `image` and a COCO `image_id`, and the COCO annotation files named in its YAML.
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
OUTPUT_TYPES = ("multiple_choice", "classification", "generate_until", "pope", "chair")
IMAGE_TYPES = ("pope", "chair")  # output types that always read an image
DEFAULTS = {  # field defaults where an output type reads a public file format
    "pope": {"doc_to_text": "text", "doc_to_target": "label"},
    "chair": {"doc_to_text": "Please describe this image in detail.", "doc_to_target": "image_id"},
}
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


class TaskError(ValueError):
    """A task that cannot be loaded; the message names the file, the record and the problem."""


@dataclass(frozen=True)
class Item:
    query: str
    choices: list[str] | None = None  # multiple_choice / classification
    gold: int | None = None
    answers: list[str] | None = None  # generate_until: accepted answers, [] = none exists (abstain)
    image: str | None = None  # path of the item's image
    objects: list[str] | None = None  # chair: the COCO categories in the image (ground truth)


@dataclass(frozen=True)
class Task:
    name: str
    output_type: str = "multiple_choice"
    data_files: dict[str, str] = field(default_factory=dict)  # split -> path
    doc_to_text: Any = None  # None: "query", or the output type's default (DEFAULTS)
    doc_to_choice: Any = "choices"
    doc_to_target: Any = None  # None: "gold", or the output type's default
    doc_to_image: str | None = None  # None: "image" for image output types, else no image
    image_root: str | None = None  # the folder image paths are relative to (default: the data file's)
    target_delimiter: str = " "
    generation_kwargs: dict = field(default_factory=dict)
    description: str = ""
    coco_instances: str | None = None  # chair: instances_*.json
    coco_captions: str | None = None  # chair: captions_*.json
    coco_synonyms: str | None = None  # chair: category synonyms (default: the bundled list)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or any(sep in self.name for sep in ("/", "\\")):
            raise TaskError(
                f"task name {self.name!r} is not a plain name: it names the run's samples_<task>.jsonl; give "
                "`task:` a name without / or \\ (e.g. mine-v2)"
            )
        if self.output_type not in OUTPUT_TYPES:
            raise TaskError(
                f"task {self.name!r}: output_type {self.output_type!r} is not one of {', '.join(OUTPUT_TYPES)}"
            )
        defaults = {"doc_to_text": "query", "doc_to_target": "gold", **DEFAULTS.get(self.output_type, {})}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.doc_to_image is None and self.output_type in IMAGE_TYPES:
            object.__setattr__(self, "doc_to_image", "image")
        if self.doc_to_image and self.output_type in ("multiple_choice", "classification"):
            raise TaskError(
                f"task {self.name!r}: images are scored by output_type pope, chair or generate_until, "
                f"not {self.output_type}"
            )
        if self.output_type == "chair" and not (self.coco_instances and self.coco_captions):
            raise TaskError(
                f"task {self.name!r}: a chair task needs the COCO annotations; give coco_instances: "
                "path/to/instances_val2014.json and coco_captions: path/to/captions_val2014.json in its YAML"
            )

    @property
    def needs_images(self) -> bool:
        return bool(self.doc_to_image)

    def split(self, name: str = "test") -> str:
        """`name`, checked to be one of the task's splits: never another split in its place, which could be the
        one a config was calibrated on."""
        if name in self.data_files:
            return name
        has = ", ".join(f"{split} ({Path(path).name})" for split, path in self.data_files.items())
        fix = "give it a YAML with a file for each split, data_files: {calib: my.calib.jsonl, test: my.test.jsonl}"
        if name != "calib":  # calibration needs items of its own; scoring can use a split the task has
            fix += f", or choose one of its splits with --split {next(iter(self.data_files))}"
        raise TaskError(f"task {self.name!r} has no {name!r} split, only {has}; {fix}")

    def items(self, split: str = "test", limit: int | None = None) -> list[Item]:
        path = Path(self.data_files[self.split(split)])
        records, lines = _read(path)
        if limit is not None:
            records, lines = records[:limit], lines[:limit]
        root = Path(self.image_root) if self.image_root else path.parent
        items = [self._item(record, f"{path}:{line}", root) for record, line in zip(records, lines, strict=True)]
        if not items:
            raise TaskError(f"task {self.name!r}: {path} has no records")
        return items

    def _item(self, doc: dict, where: str, root: Path) -> Item:
        query = _resolve(self.doc_to_text, doc, where)
        if not isinstance(query, str):
            raise TaskError(f"{where}: the query must be text, got {query!r}")
        image = _image(_resolve(self.doc_to_image, doc, where), root, where) if self.doc_to_image else None
        target = _resolve(self.doc_to_target, doc, where)
        if self.output_type == "pope":
            label = target.strip().lower() if isinstance(target, str) else target
            if label not in ("yes", "no"):
                raise TaskError(f"{where}: a POPE label is 'yes' or 'no', got {target!r}")
            return Item(query=query, choices=["no", "yes"], gold=int(label == "yes"), image=image)
        if self.output_type == "chair":
            truth = self._coco()
            image_id = int(target) if isinstance(target, str) and target.isdigit() else target
            if image_id not in truth:
                raise TaskError(
                    f"{where}: image_id {target!r} is in neither {self.coco_instances} nor {self.coco_captions}; "
                    "give each record the COCO id of its image"
                )
            return Item(query=query, image=image, objects=sorted(truth[image_id]))
        if self.output_type == "generate_until":
            answers = [target] if isinstance(target, str) else target
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise TaskError(f"{where}: the target must be an answer or a list of answers, got {target!r}")
            return Item(query=query, answers=answers, image=image)
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

    def _coco(self) -> dict:
        from . import chair

        try:
            return chair.ground_truth(
                self.coco_instances, self.coco_captions, self.coco_synonyms or str(chair.SYNONYMS)
            )
        except ValueError as error:
            raise TaskError(f"task {self.name!r}: {error}") from None


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
    fields = ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "doc_to_image")
    paths = ("image_root", "coco_instances", "coco_captions", "coco_synonyms")  # relative to the YAML
    known = {"task", "dataset_path", "data_files", "test_split", *fields, *paths}
    known |= {"target_delimiter", "generation_kwargs", "description", "metric_list"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise TaskError(f"{path}: unknown task field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
    files = spec.get("data_files") or spec.get("dataset_path")
    if isinstance(files, str):
        files = {spec.get("test_split", "test"): files}
    if not isinstance(files, dict) or not files:
        raise TaskError(f"{path}: give the data as data_files: {{test: file.jsonl}} (relative to the YAML)")
    given = {k: spec[k] for k in fields if k in spec}
    given |= {k: str(path.parent / spec[k]) for k in paths if spec.get(k)}
    given.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Task(
            name=spec.get("task", path.stem),
            data_files={split: str(path.parent / f) for split, f in files.items()},
            target_delimiter=spec.get("target_delimiter", " "),
            generation_kwargs=spec.get("generation_kwargs", {}),
            description=spec.get("description", ""),
            **given,
        )
    except TaskError as error:
        raise TaskError(f"{path}: {error}") from None


def _exists(path: Path, builtin: dict) -> None:
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist (built-in tasks: {', '.join(builtin)})")


def _read(path: Path) -> tuple[list[dict], list[int]]:
    """Records and their line numbers (record numbers for non-line formats). JSONL is read as written, line by
    line; other formats load through `datasets` (which gives a column one type: a gold of 1.5 on any line makes
    every gold a float)."""
    if not path.is_file():
        raise TaskError(f"task data file {path} does not exist")
    if path.suffix == ".jsonl":
        records, lines = _read_jsonl(path)
        if not records:
            raise TaskError(f"{path} has no records")
        return records, lines
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        table = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors in many types
        raise TaskError(f"{path}: cannot be read as {path.suffix[1:]} ({error})") from None
    records = table.to_list()
    return records, list(range(1, len(records) + 1))


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The records and their line numbers; a line that is not a JSON object is an error naming it."""
    records, numbers = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TaskError(f"{path}:{number}: not UTF-8 text ({error.reason}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise TaskError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
        records.append(record)
        numbers.append(number)
    return records, numbers


def _resolve(spec, doc: dict, where: str):
    if isinstance(spec, list):
        return [_resolve(s, doc, where) for s in spec]
    if isinstance(spec, int):
        return spec
    if spec in doc:
        return doc[spec]
    if "{{" in spec or "{%" in spec or " " in spec:  # a template; a plain word is a field name (typos fail)
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


def _image(value, root: Path, where: str) -> str:
    """The absolute path of a record's image, checked to be a readable image file."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str) or not value:
        raise TaskError(f"{where}: the image must be a file path, got {value!r}")
    path = (root / value).resolve()
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 (the header is parsed lazily)
    except FileNotFoundError:
        raise TaskError(f"{where}: image {path} does not exist (paths are relative to {root})") from None
    except (OSError, UnidentifiedImageError) as error:
        raise TaskError(f"{where}: image {path} cannot be read as an image ({error})") from None
    return str(path)


def check_modality(tasks: list[Task], model: str, vision: bool) -> None:
    """An image task on a text-only model is an error naming both and the fix."""
    for task in tasks:
        if task.needs_images and not vision:
            raise TaskError(
                f"task {task.name!r} needs images, but model {model!r} is text-only; give --model a "
                "vision-language checkpoint directory (e.g. a LLaVA one), or --model tiny-llava for a smoke test"
            )
