"""Tasks from local files: the built-in ones under `evals/data/`, a user's JSONL (or CSV / Parquet /
Arrow) file, or an lm-eval task YAML next to one.

Every task becomes a list of `Item`s. A record of `query` / `choices` / `gold` is a multiple-choice
task as it stands; other layouts say how to read a record with `doc_to_text`, `doc_to_choice` and
`doc_to_target` (a field name, or a Jinja template such as "Question: {{question}}\\nAnswer:"; a bare word that
is no field is a typo, not text). JSONL files are read line by line, other formats through `datasets`, offline;
a malformed record is reported with its file and line.

A YAML task keeps lm-eval's meaning for every lm-eval field it takes, or is refused, with every field it cannot
honour named in one error (`FIELDS`, `REFUSED`): the prompt is lm-eval's context (the description rendered on
the record, then `num_fewshot` solved examples drawn as lm-eval's sampler draws them with its seed 1234, then
the query), choices and targets are read as lm-eval reads them (a literal list or mapping of choices, a digit
rendered by a template is an index), `test_split` / `validation_split` say which split is scored, `metric_list`
which metrics are reported, and `generation_kwargs` how the scorers generate (greedy only). Its data is either
lm-eval's (`dataset_path: json|csv|parquet|arrow` with `dataset_kwargs: {data_files: ...}`, read through
`datasets` as lm-eval reads it, relative paths from the working directory) or intervene's own `data_files`
(relative to the YAML, where a missing `output_type` means multiple_choice). `Task.settings()` is what decides
a task's numbers, for the results to record.

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
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
OUTPUT_TYPES = ("multiple_choice", "classification", "generate_until", "pope", "chair")
IMAGE_TYPES = ("pope", "chair")  # output types that always read an image
CHOICE_TYPES = ("multiple_choice", "classification")  # output types that score choices
GENERATING = ("generate_until", "pope", "chair")
DEFAULTS = {  # field defaults where an output type reads a public file format
    "pope": {"doc_to_text": "text", "doc_to_target": "label"},
    "chair": {"doc_to_text": "Please describe this image in detail.", "doc_to_target": "image_id"},
}
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
BUILDERS = ("json", "csv", "parquet", "arrow")  # lm-eval's `dataset_path` for local files: a `datasets` builder
METRICS = {  # what each scorer computes; a task reports these or the ones its metric_list names
    "multiple_choice": ("acc", "acc_norm"),
    "classification": ("acc",),
    "generate_until": ("acc", "hallucination", "abstention"),
    "pope": ("acc", "precision", "recall", "f1", "yes_ratio"),
    "chair": ("chair_s", "chair_i", "recall", "length"),
}
METRIC_KEYS = ("metric", "aggregation", "higher_is_better")  # of a metric_list entry; any other is an option
RATIOS = {"pope": ("precision", "recall", "f1"), "chair": ("chair_i", "recall")}  # over the whole set, not means
MAX_TOKENS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's names of one
MAX_GEN_TOKS = {"generate_until": 256, "pope": 8, "chair": 64}  # lm-eval's default; a short answer; a caption
SAMPLING = ("temperature", "top_p", "top_k")  # what sampling reads of a task's generation_kwargs
FEWSHOT_SEED = 1234  # lm-eval's fewshot_random_seed: its sampler's shots unless a run sets another
RECORD_BYTES = 16 << 20  # a line of a data file (one record), or a whole task YAML, larger than this is refused
YAML_VALUES = 100_000  # a task YAML holds fewer values than this, aliases expanded (else a "billion laughs")

PATHS = ("image_root", "coco_instances", "coco_captions", "coco_synonyms")  # relative to the YAML
OURS = {"data_files", *PATHS}  # intervene's fields, not lm-eval's
HONOURED = {
    "task", "output_type", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "training_split",
    "fewshot_split", "num_fewshot", "description", "doc_to_text", "doc_to_choice", "doc_to_target", "doc_to_image",
    "target_delimiter", "fewshot_delimiter", "generation_kwargs", "metric_list",
}  # fmt: skip
DESCRIPTIVE = {"tag", "metadata"}  # change nothing scored: lm-eval groups tasks by tag, reads a version from metadata
REFUSED = {  # lm-eval's other fields, and why they are not honoured here
    "task_alias": "a display name for lm-eval's tables",
    "group": "a group of tasks",
    "include": "fields from another YAML",
    "class": "a Python task class",
    "dataset_name": "a configuration of a hub dataset",
    "custom_dataset": "a Python loader",
    "process_docs": "Python that rewrites the records",
    "process_results": "Python scoring",
    "use_prompt": "a promptsource prompt",
    "doc_to_audio": "audio inputs",
    "gen_prefix": "a prefix of the answer",
    "fewshot_config": "few-shot options beyond num_fewshot, fewshot_split and fewshot_delimiter",
    "filter_list": "post-processing of the answers",
    "repeats": "repeated generations",
    "should_decontaminate": "decontamination",
    "doc_to_decontamination_query": "decontamination",
    "unsafe_code": "code execution",
}
FIELDS = HONOURED | OURS | DESCRIPTIVE
FORMS = {  # the forms of each reading of a record that lm-eval takes from a YAML; doc_to_image is intervene's
    "doc_to_text": (str, int), "doc_to_target": (str, int, list), "doc_to_choice": (str, list, dict),
    "doc_to_image": (str,),
}  # fmt: skip


class TaskError(ValueError):
    """A task that cannot be loaded; the message names the file, the record and the problem."""


class Function(str):
    """The target of a YAML `!function` tag: Python code, which this reader never runs."""


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
    builder: str | None = None  # lm-eval's dataset_path (json, csv, ...): files read through `datasets` as it does
    test_split: str | None = "test"  # lm-eval's split fields: it scores test_split, else validation_split
    validation_split: str | None = None
    training_split: str | None = None
    fewshot_split: str | None = None
    num_fewshot: int = 0
    doc_to_text: Any = None  # None: "query", or the output type's default (DEFAULTS)
    doc_to_choice: Any = None  # None: "choices" where the output type scores choices
    doc_to_target: Any = None  # None: "gold", or the output type's default
    doc_to_image: str | None = None  # None: "image" for image output types, else no image
    image_root: str | None = None  # the folder image paths are relative to (default: the data file's)
    description: str = ""  # lm-eval's: a field or a template, rendered on each record and put before its prompt
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    generation_kwargs: dict = field(default_factory=dict)  # lm-eval's keys, as `generation()` reads them
    metrics: tuple[str, ...] = ()  # the metrics reported; () = all that the output type's scorer computes
    coco_instances: str | None = None  # chair: instances_*.json
    coco_captions: str | None = None  # chair: captions_*.json
    coco_synonyms: str | None = None  # chair: category synonyms (default: the bundled list)
    summary: str = ""  # the line `intervene tasks` shows (a YAML's metadata: {summary: ...}); changes nothing scored
    source: str | None = None  # the YAML the task was read from, which its errors name

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
        if self.output_type in CHOICE_TYPES:
            defaults["doc_to_choice"] = "choices"
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.doc_to_image is None and self.output_type in IMAGE_TYPES:
            object.__setattr__(self, "doc_to_image", "image")
        object.__setattr__(self, "metrics", tuple(self.metrics) or METRICS[self.output_type])
        problems = _problems(self) + _generation_problems(self.output_type, self.generation_kwargs)
        if problems:
            raise TaskError(f"task {self.name!r}: {'; '.join(problems)}")

    @property
    def needs_images(self) -> bool:
        return bool(self.doc_to_image)

    @property
    def scored_split(self) -> str:
        """The split lm-eval scores: test_split, else validation_split."""
        return self.test_split or self.validation_split or "test"

    @property
    def shots_split(self) -> str:
        """The split lm-eval draws few-shot examples from: fewshot_split, else training_split, validation_split,
        test_split."""
        return self.fewshot_split or self.training_split or self.validation_split or self.scored_split

    def split(self, name: str = "test") -> str:
        """The split that `name` means, checked to be one of the task's: "test" is the split the task scores
        (`scored_split`), another name is itself; never another split in its place, which could be the one a
        config was calibrated on."""
        split = self.scored_split if name == "test" else name
        if split in self.data_files:
            return split
        has = ", ".join(f"{split} ({Path(path).name})" for split, path in self.data_files.items())
        fix = "give it a YAML with a file for each split, data_files: {calib: my.calib.jsonl, test: my.test.jsonl}"
        if name != "calib":  # calibration needs items of its own; scoring can use a split the task has
            fix += f", or choose one of its splits with --split {next(iter(self.data_files))}"
        asked = repr(name) if split == name else f"{split!r} (the split its YAML scores)"
        raise TaskError(f"task {self.name!r} has no {asked} split, only {has}; {fix}")

    def generation(self) -> dict:
        """How the scorers generate, in lm-eval's terms: the output cut at the `until` strings (by default the
        few-shot delimiter for generate_until, as in lm-eval), at most `max_gen_toks` new tokens, greedily unless
        the task samples (`do_sample: true`, or a temperature above 0 without `do_sample`, as lm-eval reads them),
        then with the temperature, top_p and top_k it gives (those it leaves out are the model's `generate`
        defaults, as in lm-eval)."""
        kwargs = self.generation_kwargs
        until = kwargs.get("until", [self.fewshot_delimiter] if self.output_type == "generate_until" else [])
        most = next((kwargs[name] for name in MAX_TOKENS if name in kwargs), MAX_GEN_TOKS[self.output_type])
        sampled = kwargs.get("do_sample", kwargs.get("temperature", 0) > 0) is True
        until = [until] if isinstance(until, str) else list(until)
        settings = {"until": until, "max_gen_toks": most, "do_sample": sampled}
        if sampled:
            settings |= {name: kwargs[name] for name in SAMPLING if name in kwargs}
        return settings

    @property
    def samples(self) -> bool:
        """Whether the task generates by sampling (its answers then vary with the seed)."""
        return self.output_type in MAX_GEN_TOKS and self.generation()["do_sample"]

    def settings(self) -> dict:
        """What decides the task's numbers besides its data, and nothing else: how a prompt, its choices and its
        target are read, the context before the prompt, the generation settings the scorer uses, the metrics."""
        settings = {"output_type": self.output_type, "doc_to_text": self.doc_to_text}
        if self.doc_to_choice is not None:
            settings["doc_to_choice"] = self.doc_to_choice
        settings["doc_to_target"] = self.doc_to_target
        if self.doc_to_image:
            settings["doc_to_image"] = self.doc_to_image
        if self.description:
            settings["description"] = self.description
        if self.output_type in CHOICE_TYPES or self.num_fewshot:
            settings["target_delimiter"] = self.target_delimiter  # before each choice, and each example's answer
        if self.num_fewshot:
            settings |= {"num_fewshot": self.num_fewshot, "fewshot_split": self.shots_split}
            settings |= {"fewshot_delimiter": self.fewshot_delimiter, "fewshot_seed": FEWSHOT_SEED}
        if self.output_type in GENERATING:
            settings["generation_kwargs"] = self.generation()
        settings["metrics"] = list(self.metrics)
        return settings

    def items(self, split: str = "test", limit: int | None = None) -> list[Item]:
        path = Path(self.data_files[self.split(split)])
        try:
            records, lines = _read(path, self.builder)
            if limit is not None:
                records, lines = records[:limit], lines[:limit]
            root = Path(self.image_root) if self.image_root else path.parent
            context = self._context()
            items = [self._item(doc, f"{path}:{line}", root, context) for doc, line in zip(records, lines, strict=True)]
            if not items:
                raise TaskError(f"task {self.name!r}: {path} has no records")
            return items
        except TaskError as error:
            if self.source is None:
                raise
            raise TaskError(f"{self.source}: {error}") from None

    def _context(self):
        """A function from a record to lm-eval's context before its prompt: the description, then num_fewshot
        solved examples of the few-shot split, drawn as lm-eval's sampler draws them (one generator seeded 1234
        for the records in order; a record is left out of its own examples only if fewshot_split is test_split)."""
        if not self.num_fewshot:
            return lambda doc, where: _description(self.description, doc, where)
        path = Path(self.data_files[self.shots_split])
        pool = _read(path, self.builder)[0]
        n, leave_out, rnd = self.num_fewshot, self.fewshot_split == self.test_split, random.Random(FEWSHOT_SEED)
        if len(pool) < n + leave_out:
            more = " (lm-eval draws one more, to leave the question out)" if leave_out else ""
            raise TaskError(
                f"task {self.name!r}: num_fewshot {n} needs {n + leave_out} records in split {self.shots_split!r}"
                f"{more}; {path} has {len(pool)}"
            )

        def context(doc: dict, where: str) -> str:
            if not leave_out:
                shots = rnd.sample(pool, n)
            else:
                shots = [shot for shot in rnd.sample(pool, n + 1) if shot != doc][:n]
                if len(shots) < n:  # copies of the record drawn: lm-eval draws again from the other records
                    others = [shot for shot in pool if shot != doc]
                    if len(others) < n:
                        raise TaskError(f"{where}: fewer than {n} records of {path} differ from this one")
                    shots = rnd.sample(others, n)
            examples = "".join(self._example(shot, f"{path} (a few-shot example for {where})") for shot in shots)
            return _description(self.description, doc, where) + examples

        return context

    def _example(self, doc: dict, where: str) -> str:
        """A solved example as lm-eval writes one: prompt, target delimiter, answer, few-shot delimiter."""
        prompt = self._prompt(doc, where)
        target = _target(self.doc_to_target, doc, where, self.doc_to_choice is not None)
        if target is None or target == "":
            return prompt  # lm-eval: an example without an answer is its prompt alone
        if isinstance(target, int) and self.doc_to_choice is not None:
            choices = _choices(self.doc_to_choice, doc, where)
            if not 0 <= target < len(choices):
                raise TaskError(f"{where}: target {target} indexes none of the {len(choices)} choices {choices!r}")
            target = choices[target]
        answer = target[0] if isinstance(target, list) and target else target  # lm-eval: the first of several
        if not isinstance(answer, str):
            raise TaskError(f"{where}: a few-shot example's answer must be text, got {target!r}")
        return prompt + self.target_delimiter + answer + self.fewshot_delimiter

    def _prompt(self, doc: dict, where: str) -> str:
        prompt = _text(self.doc_to_text, doc, where, self.doc_to_choice is not None)
        if not isinstance(prompt, str):
            raise TaskError(
                f"{where}: the prompt must be text, got {prompt!r} (lm-eval reads a number as one prompt per "
                "choice, which intervene's scorers do not take; run it as an lm-eval task, or make doc_to_text text)"
            )
        return prompt

    def _item(self, doc: dict, where: str, root: Path, context) -> Item:
        query = context(doc, where) + self._prompt(doc, where)
        image = None
        if self.doc_to_image:
            image = _image(_lookup(self.doc_to_image, doc, where, "doc_to_image"), root, where)
        target = _target(self.doc_to_target, doc, where, self.doc_to_choice is not None)
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
            if self.doc_to_choice is not None:  # lm-eval: the target indexes the choices, and that choice is the answer
                choices = _choices(self.doc_to_choice, doc, where)
                if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(choices):
                    raise TaskError(f"{where}: with doc_to_choice the target must index {choices!r}, got {target!r}")
                target = choices[target]
            if isinstance(target, int) and not isinstance(target, bool):
                target = str(target)  # lm-eval compares a number as the text of the number
            answers = [target] if isinstance(target, str) else target
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise TaskError(f"{where}: the target must be an answer or a list of answers, got {target!r}")
            return Item(query=query, answers=answers, image=image)
        choices = _choices(self.doc_to_choice, doc, where)
        if isinstance(choices, str):  # a field holding a list written as text, as in a CSV column
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
    """The task of an lm-eval-style YAML. Every field it cannot honour, and every unknown field, is named in one
    error. Without output_type, lm-eval's data (dataset_path: json, ...) is read as lm-eval does, as a
    generate_until task; intervene's own data_files as a multiple-choice one."""
    import yaml

    _regular(path, "task file")
    if path.stat().st_size > RECORD_BYTES:
        raise TaskError(f"{path}: a task file of more than {RECORD_BYTES >> 20} MiB is not a task file")
    try:
        spec = yaml.load(path.read_bytes(), Loader=_loader())  # safe, and reads !function tags
    except yaml.YAMLError as error:
        raise TaskError(f"{path}: not valid YAML ({error})") from None
    except RecursionError:
        raise TaskError(f"{path}: nested deeper than a task file can be") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a task file is a mapping of task fields")
    if _values(spec) > YAML_VALUES:
        raise TaskError(
            f"{path}: more than {YAML_VALUES} values once its aliases (*name) are expanded; aliases of aliases can "
            "stand for billions, which is not a task file"
        )
    output_type = spec.get(
        "output_type", "generate_until" if spec.get("dataset_path") in BUILDERS else "multiple_choice"
    )
    data_files, problems = _data(spec, path)
    problems += [f"{name} ({REFUSED[name]})" for name in spec if name in REFUSED]
    problems += [f"{name} (!function {code}: Python code)" for name, code in map(_function, spec.items()) if code]
    if output_type in ("loglikelihood", "loglikelihood_rolling"):
        problems.append(f"output_type {output_type} (lm-eval's log-likelihood metrics)")
    metrics, wrong = _metric_list(output_type, spec.get("metric_list"))
    problems += wrong + _generation_problems(output_type, spec.get("generation_kwargs") or {})
    unknown = sorted(name for name in spec if name not in FIELDS | REFUSED.keys())
    if problems or unknown:
        raise TaskError(f"{path}: " + "; ".join(_refusal(spec, path, problems, unknown)))
    if data_files is None:
        raise TaskError(
            f"{path}: give the data as data_files: {{test: file.jsonl}} (relative to the YAML), or as lm-eval does, "
            "dataset_path: json and dataset_kwargs: {data_files: {test: file.jsonl}} (a file for each split)"
        )
    splits = {name: spec[name] for name in ("test_split", "validation_split", "training_split") if name in spec}
    if "validation_split" in splits and "test_split" not in splits:
        splits["test_split"] = None  # lm-eval then scores the validation split
    given = {k: spec[k] for k in (*FORMS, "description", "target_delimiter", "fewshot_delimiter") if k in spec}
    given |= {k: spec[k] for k in ("fewshot_split", "num_fewshot") if spec.get(k) is not None}  # null: lm-eval's none
    given |= {k: str(path.parent / spec[k]) for k in PATHS if spec.get(k)}
    named = {f"{split} data": file for split, file in data_files.items()}
    _inside(path, named | {k: given[k] for k in PATHS if k in given and k != "image_root"})
    given.update({k: v for k, v in overrides.items() if v is not None})
    metadata = spec.get("metadata") if isinstance(spec.get("metadata"), dict) else {}
    try:
        return Task(
            name=spec.get("task", path.stem),
            output_type=output_type,
            data_files=data_files,
            builder=spec.get("dataset_path") if spec.get("dataset_path") in BUILDERS else None,
            generation_kwargs=spec.get("generation_kwargs") or {},
            metrics=metrics,
            summary=str(metadata.get("summary", "")),
            source=str(path),
            **splits,
            **given,
        )
    except TaskError as error:
        raise TaskError(f"{path}: {error}") from None


@functools.cache
def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML's safe loader, reading lm-eval's `!function` tags as `Function`s."""

    Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))
    return Loader


def _refusal(spec: dict, path: Path, problems: list[str], unknown: list[str]) -> list[str]:
    """The error's parts: what the reader does not honour, with the route that does (lm-eval); unknown fields."""
    parts = []
    if problems:
        route = f"intervene eval --tasks {spec.get('task', path.stem)} --include-path {path.parent}"
        if "data_files" in spec:
            route += " (with its data as dataset_path: json and dataset_kwargs: {data_files: ...})"
        parts.append(
            f"intervene's own reader does not honour {', '.join(problems)}; run it as an lm-eval task: {route}"
        )
    if unknown:
        parts.append(
            f"unknown task field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; known fields: "
            f"{', '.join(sorted(FIELDS))}"
        )
    return parts


def _data(spec: dict, path: Path) -> tuple[dict[str, str] | None, list[str]]:
    """`(split -> file, problems)`: lm-eval's `dataset_path: json` with `dataset_kwargs: {data_files: ...}` (one
    file is `datasets`' split "train"; relative paths from the working directory, as lm-eval reads them), or
    intervene's `data_files` or `dataset_path: file.jsonl` (one file is the scored split; relative to the YAML).
    No files (None) where they are missing or malformed."""
    source, kwargs = spec.get("dataset_path"), spec.get("dataset_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        return None, [f"dataset_kwargs {kwargs!r} (a mapping: {{data_files: {{test: data.jsonl}}}})"]
    problems = [f"dataset_kwargs {key} (an option of `datasets`)" for key in (kwargs or {}) if key != "data_files"]
    if source in BUILDERS:
        if "data_files" in spec:
            problems.append("data_files beside dataset_path: json (give the data once, in dataset_kwargs.data_files)")
        files = (kwargs or {}).get("data_files")
        base, files = Path.cwd(), {"train": files} if isinstance(files, str) else files
    elif isinstance(source, str) and Path(source).suffix not in FORMATS:
        return None, [*problems, f"dataset_path {source} (a hub dataset or a loading script; this reader reads files)"]
    elif kwargs is not None:
        return None, [*problems, "dataset_kwargs without dataset_path json, csv, parquet or arrow"]
    else:
        files = spec.get("data_files") or source
        if isinstance(files, str):
            files = {spec.get("test_split") or spec.get("validation_split") or "test": files}
        base = path.parent
    if not isinstance(files, dict) or not files or not all(isinstance(file, str) for file in files.values()):
        return None, problems
    return {str(split): str(base / file) for split, file in files.items()}, problems


def _problems(task: Task) -> list[str]:
    """What is wrong with a task's values, each with its fix."""
    problems = [f"{name} {getattr(task, name)!r} must be text" for name in ("description", "target_delimiter",
                "fewshot_delimiter") if not isinstance(getattr(task, name), str)]  # fmt: skip
    for name, forms in FORMS.items():
        value = getattr(task, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, forms)):
            problems.append(f"{name} {value!r} must be a {' or '.join(form.__name__ for form in forms)}")
    splits = {
        name: getattr(task, name) for name in ("test_split", "validation_split", "training_split", "fewshot_split")
    }
    problems += [
        f"{name} {value!r} must name a split" for name, value in splits.items() if not isinstance(value, str | None)
    ]
    problems += [
        f"metric {m!r} ({_computes(task.output_type)})" for m in task.metrics if m not in METRICS[task.output_type]
    ]
    n = task.num_fewshot
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        problems.append(f"num_fewshot {n!r} must be a whole number of examples, 0 or more")
    elif n and task.needs_images:
        problems.append(f"num_fewshot {n} (few-shot examples are text; an image task takes one image per prompt)")
    elif n and task.shots_split not in task.data_files:
        problems.append(
            f"num_fewshot {n} draws examples from split {task.shots_split!r} (fewshot_split, else training_split, "
            f"validation_split, test_split, as in lm-eval), which is none of its splits {', '.join(task.data_files)}; "
            "give fewshot_split one of those"
        )
    if task.doc_to_image and task.output_type in CHOICE_TYPES:
        problems.append(f"images are scored by output_type pope, chair or generate_until, not {task.output_type}")
    if task.output_type == "chair" and not (task.coco_instances and task.coco_captions):
        problems.append(
            "a chair task needs the COCO annotations; give coco_instances: path/to/instances_val2014.json and "
            "coco_captions: path/to/captions_val2014.json in its YAML"
        )
    return problems


def _generation_problems(output_type: str, kwargs) -> list[str]:
    """The generation settings that the scorers would not use as lm-eval does."""
    if not isinstance(kwargs, dict):
        return [f"generation_kwargs {kwargs!r} (a mapping such as {{until: ['\\n'], max_gen_toks: 32}})"]
    if kwargs and output_type not in GENERATING:
        return [f"generation_kwargs (a {output_type} task generates nothing; drop them)"]
    given = [name for name in MAX_TOKENS if name in kwargs]
    problems = (
        [f"generation_kwargs {' and '.join(given)} (one setting; give max_gen_toks alone)"] if len(given) > 1 else []
    )
    for key, value in kwargs.items():
        if key == "until":
            if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                problems.append(f"generation_kwargs until {value!r} (a stop string or a list of them)")
        elif key in MAX_TOKENS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"generation_kwargs {key} {value!r} (a whole number of tokens, 1 or more)")
        elif key == "do_sample":
            if not isinstance(value, bool):
                problems.append(f"generation_kwargs do_sample {value!r} (true or false)")
            elif value and kwargs.get("temperature") == 0:
                problems.append("generation_kwargs do_sample true with temperature 0 (give a temperature above 0)")
        elif key == "temperature":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                problems.append(f"generation_kwargs temperature {value!r} (a number, 0 or more)")
        elif key == "top_p":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                problems.append(f"generation_kwargs top_p {value!r} (a number in (0, 1])")
        elif key == "top_k":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"generation_kwargs top_k {value!r} (a whole number, 0 or more; 0 is off)")
        else:
            problems.append(
                f"generation_kwargs {key} (the scorers read until, max_gen_toks, do_sample, temperature, top_p, top_k)"
            )
    return problems


def _metric_list(output_type: str, entries) -> tuple[tuple[str, ...], list[str]]:
    """`(metrics, problems)` of lm-eval's `metric_list`: each `- metric: name` must be one the output type's scorer
    computes, with no aggregation but the one it uses and no option (ignore_case, regexes_to_ignore, ...);
    `higher_is_better` is taken, as it changes no number."""
    if entries is None:
        return (), []
    if not isinstance(entries, list) or not entries:
        return (), [f"metric_list {entries!r} (a list of entries such as - metric: acc)"]
    names, problems = [], []
    for entry in entries:
        name = entry.get("metric") if isinstance(entry, dict) else None
        if isinstance(name, Function):
            continue  # named with the other !function fields
        if not isinstance(name, str):
            problems.append(f"metric_list entry {entry!r} (an entry is a mapping such as - metric: acc)")
            continue
        if name not in METRICS.get(output_type, ()):
            problems.append(f"metric_list {name} ({_computes(output_type)})")
        ratio = name in RATIOS.get(output_type, ())
        if "aggregation" in entry and (ratio or entry["aggregation"] != "mean"):
            kind = "a ratio over the whole set" if ratio else "the mean over the items"
            problems.append(f"metric_list {name} aggregation {entry['aggregation']} ({name} is {kind})")
        problems += [f"metric_list {name} option {option}" for option in entry if option not in METRIC_KEYS]
        names += [name] * (name not in names)
    return tuple(names), problems


def _computes(output_type: str) -> str:
    if output_type not in METRICS:
        return f"output_type {output_type} has no scorer here"
    return f"intervene's {output_type} scorer computes {', '.join(METRICS[output_type])}"


def _function(item: tuple[str, Any]) -> tuple[str, str | None]:
    """`(field, the first !function target in its value or None)`."""
    name, value = item
    if isinstance(value, Function):
        return name, str(value)
    inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return name, next((code for _, code in map(_function, ((name, v) for v in inner)) if code), None)


def _exists(path: Path, builtin: dict) -> None:
    if not path.exists():
        raise TaskError(f"task file {path} does not exist (built-in tasks: {', '.join(builtin)})")
    _regular(path, "task file")


def _regular(path: Path, what: str) -> None:
    """A file to read is a regular file: reading a device, a pipe or a folder would fill memory or never end."""
    if path.exists() and not path.is_file():
        raise TaskError(f"{what} {path} is not a regular file (a folder, device or pipe); name a file")


def _inside(path: Path, files: dict[str, str]) -> None:
    """A task file is data and may be someone else's: the files it names (`what -> path`) lie under its own
    folder once links are followed, or none is read, so that no YAML turns ~/.netrc into prompts in a results
    folder. Images are only ever decoded as images, so image_root may lie anywhere (a COCO folder)."""
    home = path.parent.resolve()
    outside = []
    for what, file in files.items():
        resolved = Path(file).resolve()
        if not resolved.is_relative_to(home):
            link = f" (a link to {resolved})" if resolved != Path(os.path.abspath(file)) else ""
            outside.append(f"{what} {file}{link}")
    if outside:
        raise TaskError(
            f"{path}: names files outside its folder {home}: {'; '.join(outside)}. A task file is data and reads "
            "only files under the folder it lies in (links followed); put the YAML beside its data, or give the "
            "data file itself to --tasks"
        )
    for what, file in files.items():
        _regular(Path(file), f"{path}: {what}")


def _values(spec) -> int:
    """How many values a YAML holds once its aliases are expanded, counted up to just past YAML_VALUES."""
    stack, count = [spec], 0
    while stack and count <= YAML_VALUES:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            stack += value
    return count


def _read(path: Path, builder: str | None = None) -> tuple[list[dict], list[int]]:
    """Records and their line numbers (record numbers for non-line formats). A JSONL file of intervene's own
    `data_files` is read as written, line by line; other files load through `datasets`, with lm-eval's
    `dataset_path` builder or the one their suffix names (which gives a column one type: a gold of 1.5 on any
    line makes every gold a float)."""
    if not path.exists():
        raise TaskError(f"task data file {path} does not exist")
    _regular(path, "task data file")
    if builder is None and path.suffix == ".jsonl":
        records, lines = _read_jsonl(path)
    elif builder is None and path.suffix not in FORMATS:
        raise TaskError(f"{path}: a data file ends in {', '.join(FORMATS)}, or its YAML names its format")
    else:
        if (builder or FORMATS[path.suffix]) in ("json", "csv"):
            for _ in _lines(path):  # text of one record a line: none longer than RECORD_BYTES
                pass
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        try:
            table = datasets.load_dataset(builder or FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # datasets wraps parser errors in many types
            raise TaskError(f"{path}: cannot be read as {builder or path.suffix[1:]} ({error})") from None
        records = table.to_list()
        lines = list(range(1, len(records) + 1))
    if not records:
        raise TaskError(f"{path} has no records")
    return records, lines


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The records and their line numbers; a line that is not a JSON object is an error naming it."""
    records, numbers = [], []
    for number, raw in _lines(path):
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
        except RecursionError:
            raise TaskError(f"{path}:{number}: nested deeper than a record can be") from None
        if not isinstance(record, dict):
            raise TaskError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
        records.append(record)
        numbers.append(number)
    return records, numbers


def _lines(path: Path):
    """`(number, bytes)` of each line of a text file; a line longer than RECORD_BYTES is refused once that much is
    read (a 1 GB line is no record, and reading it whole would fill memory)."""
    with path.open("rb") as file:
        for number, raw in enumerate(iter(lambda: file.readline(RECORD_BYTES + 1), b""), start=1):
            if len(raw) > RECORD_BYTES:
                raise TaskError(
                    f"{path}:{number}: a line longer than {RECORD_BYTES >> 20} MiB, more than a record may be; a "
                    "data file holds one record a line (JSON Lines, CSV)"
                )
            yield number, raw


# A record read as lm-eval's ConfigurableTask reads it: doc_to_text, doc_to_target, doc_to_choice, description.


def _text(spec, doc: dict, where: str, has_choices: bool):
    if isinstance(spec, int) or spec in doc:
        return spec if isinstance(spec, int) else doc[spec]
    text = _render(spec, doc, where, "doc_to_text")
    return _literal(text, where) if text.isdigit() and has_choices else text  # lm-eval: one prompt per choice


def _target(spec, doc: dict, where: str, has_choices: bool):
    if isinstance(spec, int | list) or spec in doc:
        return spec if isinstance(spec, int | list) else doc[spec]
    text = _render(spec, doc, where, "doc_to_target")
    if text.isdigit() and has_choices:
        return _literal(text, where)  # an index into the choices
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":  # several targets, where it parses as a list
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def _choices(spec, doc: dict, where: str):
    if isinstance(spec, list):
        return spec  # the choices themselves, not fields
    if isinstance(spec, dict):
        return list(spec.values())
    return doc[spec] if spec in doc else _literal(_render(spec, doc, where, "doc_to_choice"), where)


def _description(spec: str, doc: dict, where: str) -> str:
    """lm-eval's description: a field's value or a template rendered on the record (a bare word is text here)."""
    text = (doc[spec] if spec in doc else _jinja(spec, doc, where, "description")) if spec else ""
    if not isinstance(text, str):
        raise TaskError(f"{where}: the description must be text, got {text!r}")
    return text


def _lookup(spec: str, doc: dict, where: str, field: str):
    return doc[spec] if spec in doc else _render(spec, doc, where, field)


def _render(spec: str, doc: dict, where: str, field: str) -> str:
    """The task's `field`, a template, rendered on the record; a bare word that is no field is a typo (lm-eval
    would take it as text)."""
    if re.fullmatch(r"[\w.-]+", spec):
        raise TaskError(
            f"{where}: {field}: the record has no field {spec!r}; its fields are: {', '.join(doc)} (for the text "
            f"itself, write it as a template: \"{{{{ '{spec}' }}}}\")"
        )
    return _jinja(spec, doc, where, field)


RENDER_SECONDS = 2.0  # a template that takes longer on one record (a loop that never ends) is refused
RENDER_CHARACTERS = 1 << 20  # nor may `*` or `**` build a text, list or number larger than this


class _TooLong(Exception):
    pass


def _jinja(spec: str, doc: dict, where: str, field: str) -> str:
    """The task's `field`, a template, rendered on the record in the bounded sandbox (see `_template`): a template
    that reaches outside it, runs past RENDER_SECONDS or builds something huge is a TaskError naming the field and
    the template, never code run or a hang."""
    import signal
    import threading

    import jinja2

    def stop(signum, frame):
        raise _TooLong

    timed = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    if timed:
        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
    try:
        return _template(spec).render(**doc)
    except jinja2.sandbox.SecurityError as error:
        raise TaskError(
            f"{where}: {field} template {spec!r} is refused by the sandbox a task's templates run in: {error}"
        ) from None
    except _TooLong:
        raise TaskError(f"{where}: {field} template {spec!r} ran past {RENDER_SECONDS:g} s on one record; a "
                        "template formats a record, it does not compute") from None  # fmt: skip
    except jinja2.TemplateError as error:
        raise TaskError(f"{where}: {field} template {spec!r} failed: {error}") from None
    except Exception as error:  # whatever a template raises on a record (IndexError, RecursionError, ...) is the task's
        raise TaskError(f"{where}: {field} template {spec!r} failed: {type(error).__name__}: {error}") from None
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@functools.cache
def _template(spec: str):
    """lm-eval's Jinja environment (strict, trailing newlines kept, its regex_replace filter) in jinja2's immutable
    sandbox: a task file is data, so its templates reach no attribute that starts with `_` nor any that could run
    code or change a value (`__globals__`, `mro`, `os`, `append`, `str.format` tricks), and `*` / `**` build nothing
    larger than RENDER_CHARACTERS (range() is capped by the sandbox itself)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (left, right))
            if operator == "**" and numbers and abs(left) > 1 and right * math.log2(abs(left)) > 8 * RENDER_CHARACTERS:
                raise SecurityError(f"{left} ** {right} is a number larger than a template may build")
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            repeated = operator == "*" and isinstance(sized, str | list | tuple) and isinstance(count, int)
            if repeated and len(sized) * count > RENDER_CHARACTERS:
                raise SecurityError(f"a text or list of {len(sized) * count} items is larger than a template may build")
            return super().call_binop(context, operator, left, right)

    environment = Bounded(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["regex_replace"] = lambda text, pattern, repl, count=0: re.sub(pattern, repl, text, count=count)
    return environment.from_string(spec)


def _literal(text: str, where: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise TaskError(f"{where}: {text!r} is neither a choice nor a Python literal") from None


def _image(value, root: Path, where: str) -> str:
    """The absolute path of a record's image, checked to be a readable image file (a regular file: a pipe would
    never end; of PIL's size: a header that claims billions of pixels is a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str) or not value:
        raise TaskError(f"{where}: the image must be a file path, got {value!r}")
    path = (root / value).resolve()
    _regular(path, f"{where}: image")
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 (the header is parsed lazily)
    except FileNotFoundError:
        raise TaskError(f"{where}: image {path} does not exist (paths are relative to {root})") from None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
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


def check_seeds(seeds: int, tasks: list[Task]) -> None:
    """`--seeds` repeats the tasks that sample: a count below 1, or one above 1 where no task samples, is refused."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise TaskError(f"--seeds {seeds!r}: give how many seeds each task that samples runs with, 1 or more")
    if seeds > 1 and not any(task.samples for task in tasks):
        names = ", ".join(task.name for task in tasks)
        raise TaskError(
            f"--seeds {seeds} repeats the tasks that sample, and none of {names} samples (greedy decoding gives the "
            "same answers with any seed): drop --seeds, or give a task whose generation_kwargs sample "
            "(do_sample: true)"
        )
