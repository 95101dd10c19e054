"""A task file is data, never code: a hostile corpus of templates, YAML, paths and sizes. Each case is refused
with a clear message naming the task file (or renders as harmless text), in bounded time, never executed,
never a traceback, and through the CLI leaves nothing behind: no output folder, no file touched."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib

import pytest
from typer.testing import CliRunner

from intervene.cli import app
from intervene.evals.tasks import RENDER_SECONDS, TaskError, load_yaml

RECORD = {"q": "What?", "choices": ["a", "b"], "gold": 0}
GIGABYTE = 1 << 30


def task_file(folder, doc_to_text: str = "{{ q }}", extra: str = "", data: str = "data_files: {test: data.jsonl}"):
    """evil.yaml in `folder`, a multiple-choice task over data.jsonl beside it (one record) unless `data` says
    otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text(json.dumps(RECORD) + "\n")
    (folder / "evil.yaml").write_text(
        f"task: evil\noutput_type: multiple_choice\n{data}\n"
        f"doc_to_text: {json.dumps(doc_to_text)}\ndoc_to_choice: choices\ndoc_to_target: gold\n{extra}"
    )
    return folder / "evil.yaml"


def template(text: str):
    return lambda tmp_path: task_file(tmp_path, text)


# Server-side template injection: each reaches for code through an attribute chain. The sandbox refuses the
# access, or gives an undefined value (or an error) in its place, which fails the task.
ESCAPED = r"data.jsonl:1: doc_to_text template .* (is refused by the sandbox a task's templates run in|failed: .*)"
ESCAPES = {
    "cycler globals (the issue's YAML)": "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}{{q}}",
    "joiner globals": "{{ joiner.__init__.__globals__.os.popen('touch PWNED').read() }}",
    "namespace globals": "{{ namespace.__init__.__globals__.os.system('touch PWNED') }}",
    "lipsum globals": "{{ lipsum.__globals__['os'].system('touch PWNED') }}",
    "self": "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch PWNED') }}",
    "mro subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "attr filter": "{{ (''|attr('__class__')|attr('__mro__'))[1] }}",
    "str.format": "{{ '{0.__class__.__mro__}'.format(q) }}",
    "format_map": "{{ '{0.__class__}'.format_map(q) }}",
    "mutation": "{{ choices.append('x') }}{{ q }}",
    "record's class": "{{ q.__class__.__base__.__subclasses__() }}",
}

# Templates that would hang or fill memory.
BOUNDED = r"data.jsonl:1: doc_to_text template .* (refused by the sandbox|ran past|failed)"
BOUNDS = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{{ q }}",
    "loop that never ends": "{% for a in range(100000) %}{% for b in range(100000) %}{{ b }}{% endfor %}{% endfor %}",
    "huge string": "{{ 'x' * 10000000000 }}",
    "huge list": "{{ [0] * 100000000 }}",
    "huge number": "{{ 10 ** 100000000 }}",
    "range past the sandbox's cap": "{{ range(10 ** 12) | list }}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
}


def python_tag(tmp_path):
    return task_file(tmp_path, extra="metadata: !!python/object/apply:os.system ['touch PWNED']\n")


def billion_laughs(tmp_path):
    laughs = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    return task_file(tmp_path, extra="metadata:\n" + "".join(f"  {line}\n" for line in laughs))


def deep_yaml(tmp_path):
    return task_file(tmp_path, extra="metadata: " + "[" * 100_000 + "]" * 100_000 + "\n")


def huge_yaml(tmp_path):
    path = task_file(tmp_path)
    with path.open("r+b") as file:
        file.truncate(GIGABYTE)  # sparse: a 1 GB file of one line, written in no time
    return path


YAMLS = {  # (the task file, what the refusal says)
    "python YAML tag": (python_tag, r"evil.yaml: not valid YAML"),
    "billion laughs (aliases of aliases)": (billion_laughs, r"evil.yaml: more than 100000 values once its aliases"),
    "YAML nested 100000 deep": (deep_yaml, r"evil.yaml: nested deeper than a task file can be"),
    "1 GB task file": (huge_yaml, r"evil.yaml: a task file of more than 16 MiB is not a task file"),
}


def elsewhere(tmp_path):
    """A JSONL file of records outside the task's folder: the secret a YAML must not read."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "secret.jsonl").write_text(json.dumps(RECORD) + "\n")
    return tmp_path / "home" / "secret.jsonl"


def absolute_path(tmp_path):
    return task_file(tmp_path / "task", data=f"data_files: {{test: {elsewhere(tmp_path)}}}")


def parent_path(tmp_path):
    elsewhere(tmp_path)
    return task_file(tmp_path / "task", data="data_files: {test: ../home/secret.jsonl}")


def linked_file(tmp_path):
    path = task_file(tmp_path / "task")
    (tmp_path / "task" / "data.jsonl").unlink()
    (tmp_path / "task" / "data.jsonl").symlink_to(elsewhere(tmp_path))
    return path


def linked_folder(tmp_path):
    secret = elsewhere(tmp_path)
    path = task_file(tmp_path / "task", data="data_files: {test: sub/secret.jsonl}")
    (tmp_path / "task" / "sub").symlink_to(secret.parent)
    return path


def lm_eval_absolute(tmp_path):
    data = f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {elsewhere(tmp_path)}}}}}"
    return task_file(tmp_path / "task", data=data)


def coco_outside(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "instances.json").write_text("{}")
    return task_file(tmp_path / "task", extra=f"coco_instances: {tmp_path / 'home' / 'instances.json'}\n")


def device(tmp_path):
    return task_file(tmp_path, data="data_files: {test: /dev/zero}")


def pipe(tmp_path):
    path = task_file(tmp_path)
    (tmp_path / "data.jsonl").unlink()
    os.mkfifo(tmp_path / "data.jsonl")  # a read would wait forever for a writer
    return path


def image_task(tmp_path, image: str):
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": image, "text": "Is there a cat?", "label": "yes"}) + "\n")
    (tmp_path / "evil.yaml").write_text("task: evil\noutput_type: pope\ndata_files: {test: data.jsonl}\n")
    return tmp_path / "evil.yaml"


def image_pipe(tmp_path):
    os.mkfifo(tmp_path / "photo.png")
    return image_task(tmp_path, "photo.png")


def image_bomb(tmp_path):
    """A PNG whose header claims 10^10 pixels: a decompression bomb, refused from its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return image_task(tmp_path, "photo.png")


def outside(named: str) -> str:
    return rf"evil.yaml: names files outside its folder .*: {named}\. A task file is data and reads only files under"


PATHS = {
    "absolute data path": (absolute_path, outside(r"test data /.*home/secret.jsonl")),
    "data path through ..": (parent_path, outside(r"test data .*/task/\.\./home/secret.jsonl")),
    "data file linked outside": (linked_file, outside(r"test data .*/data.jsonl \(a link to /.*/secret.jsonl\)")),
    "folder linked outside": (linked_folder, outside(r"test data .*sub/secret.jsonl \(a link to /.*/secret.jsonl\)")),
    "lm-eval data_files, absolute": (lm_eval_absolute, outside(r"test data /.*home/secret.jsonl")),
    "COCO annotations outside": (coco_outside, outside(r"coco_instances /.*home/instances.json")),
    "data file /dev/zero": (device, outside(r"test data /dev/zero")),
    "data file a named pipe": (pipe, r"evil.yaml: test data .*data.jsonl is not a regular file"),
    "image a named pipe": (image_pipe, r"data.jsonl:1: image .*photo.png is not a regular file"),
    "image a decompression bomb": (image_bomb, r"data.jsonl:1: image .*photo.png cannot be read as an image"),
}


def huge_line(tmp_path, line: int = 1):
    path = task_file(tmp_path)
    with (tmp_path / "data.jsonl").open("r+b") as file:
        if line == 1:
            file.truncate(0)
        file.seek(0, os.SEEK_END)
        file.truncate(file.tell() + GIGABYTE)  # sparse: a 1 GB line of NUL bytes, written in no time
    return path


def huge_csv_line(tmp_path):
    path = task_file(tmp_path, data="dataset_path: csv\ndataset_kwargs: {data_files: {test: data.csv}}")
    (tmp_path / "data.csv").write_text("q,choices,gold\n")
    with (tmp_path / "data.csv").open("r+b") as file:
        file.truncate(15 + GIGABYTE)
    return path


def deep_record(tmp_path):
    path = task_file(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"q": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return path


SIZES = {
    "1 GB first line": (huge_line, r"data.jsonl:1: a line longer than 16 MiB, more than a record may be"),
    "1 GB second line": (lambda p: huge_line(p, 2), r"data.jsonl:2: a line longer than 16 MiB"),
    "1 GB line of a CSV (lm-eval's dataset_path)": (huge_csv_line, r"data.csv:2: a line longer than 16 MiB"),
    "record nested 100000 deep": (deep_record, r"data.jsonl:1: nested deeper than a record can be"),
}

# Every refused case: (task file, what the refusal says after the task file's name)
REFUSED = {
    **{name: (template(text), ESCAPED) for name, text in ESCAPES.items()},
    **{name: (template(text), BOUNDED) for name, text in BOUNDS.items()},
    **YAMLS,
    **PATHS,
    **SIZES,
}


def refused(tmp_path, name: str) -> str:
    """The case built in tmp_path, read as `intervene eval` reads it before a model loads; what the refusal says."""
    build, said = REFUSED[name]
    path = build(tmp_path)
    began = time.perf_counter()
    with pytest.raises(TaskError) as error:
        load_yaml(path).items(limit=1)
    assert time.perf_counter() - began < RENDER_SECONDS + 3
    assert error.match(said) and str(error.value).startswith(str(path)), error.value
    return str(error.value)


@pytest.mark.parametrize("name", REFUSED)
def test_each_hostile_case_is_refused_in_bounded_time_naming_the_task_file(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(tmp_path, name)
    assert not (tmp_path / "PWNED").exists()


def files(folder) -> set:
    """Every path under `folder` with its kind and size (links not followed, sparse files not read)."""
    return {
        (os.path.relpath(os.path.join(root, name), folder), os.path.islink(os.path.join(root, name)),
         os.lstat(os.path.join(root, name)).st_size)
        for root, folders, names in os.walk(folder) for name in folders + names
    }  # fmt: skip


@pytest.mark.parametrize("name", REFUSED)
def test_each_hostile_case_through_the_cli_leaves_no_trace_and_exits_with_the_message(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = REFUSED[name][0](tmp_path)
    before = files(tmp_path)
    model = ["--model", "tiny-llava"] if "image" in name else []  # image tasks are refused on a text model first
    args = ["eval", "--method", "zerotuning", "--param", "gamma=2", "--tasks", str(task), "--limit", "1", *model]
    result = CliRunner().invoke(app, [*args, "--output-path", "out"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(task) in result.output and "error:" in result.output
    assert files(tmp_path) == before  # no PWNED, no out/, nothing written or removed


HARMLESS = {  # tricks that render as the text they are
    "percent format": ("{{ '%(q)s %s' }}", "%(q)s %s"),
    "braces": ("{{ '{0.__class__}' }} {{ q }}", "{0.__class__} What?"),
    "escaped jinja": ("{{ '{{ 7 * 7 }}' }}", "{{ 7 * 7 }}"),
    "html": ("<script>{{ q }}</script>", "<script>What?</script>"),
}


@pytest.mark.parametrize("template, text", HARMLESS.values(), ids=HARMLESS.keys())
def test_format_string_tricks_render_as_harmless_text(tmp_path, template, text):
    (item,) = load_yaml(task_file(tmp_path, template)).items()
    assert item.query == text


def test_links_and_absolute_paths_that_stay_in_the_task_folder_are_read(tmp_path):
    path = task_file(tmp_path / "task", data=f"data_files: {{test: {tmp_path / 'task' / 'sub' / 'linked.jsonl'}}}")
    (tmp_path / "task" / "sub").mkdir()
    (tmp_path / "task" / "sub" / "linked.jsonl").symlink_to(tmp_path / "task" / "data.jsonl")
    (item,) = load_yaml(path).items()
    assert (item.query, item.choices, item.gold) == ("What?", ["a", "b"], 0)


def test_a_line_of_exactly_the_limit_is_a_record(tmp_path, monkeypatch):
    """The limit counts the line's bytes with its newline: a record of that size is read, one byte more is not."""
    import intervene.evals.tasks as tasks

    line = json.dumps({**RECORD, "q": "x" * 100}) + "\n"
    monkeypatch.setattr(tasks, "RECORD_BYTES", len(line.encode()))
    path = task_file(tmp_path)
    (tmp_path / "data.jsonl").write_text(line)
    assert load_yaml(path).items()[0].query == "x" * 100
    (tmp_path / "data.jsonl").write_text(line.replace("x", "xx", 1))
    with pytest.raises(TaskError, match=r"data.jsonl:1: a line longer than"):
        load_yaml(path).items()
