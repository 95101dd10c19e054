"""A task file is data, never code: hostile templates and YAML are refused with a clear message (or render as
harmless text), never executed, never a hang, never a traceback, and leave nothing behind."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from intervene.cli import app
from intervene.evals.tasks import RENDER_SECONDS, TaskError, load_yaml

RECORD = {"q": "What?", "choices": ["a", "b"], "gold": 0}


def task_file(tmp_path, doc_to_text: str, extra: str = "") -> object:
    (tmp_path / "data.jsonl").write_text(json.dumps(RECORD) + "\n")
    (tmp_path / "evil.yaml").write_text(
        "task: evil\noutput_type: multiple_choice\ndata_files: {test: data.jsonl}\n"
        f"doc_to_text: {json.dumps(doc_to_text)}\ndoc_to_choice: choices\ndoc_to_target: gold\n{extra}"
    )
    return tmp_path / "evil.yaml"


ESCAPES = {  # server-side template injection: each reaches for code through an attribute chain
    "cycler globals": "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
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


@pytest.mark.parametrize("template", ESCAPES.values(), ids=ESCAPES.keys())
def test_a_template_that_reaches_outside_the_sandbox_is_refused_by_name(tmp_path, template, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = load_yaml(task_file(tmp_path, template))
    # the sandbox refuses the access, or gives an undefined value (or an error) in its place, which fails the task
    refused = r"data.jsonl:1: template .* (is refused by the sandbox a task's templates run in|failed: .*)"
    with pytest.raises(TaskError, match=refused):
        task.items()
    assert not (tmp_path / "PWNED").exists()


BOUNDS = {  # templates that would hang or fill memory
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{{ q }}",
    "loop that never ends": "{% for a in range(100000) %}{% for b in range(100000) %}{{ b }}{% endfor %}{% endfor %}",
    "huge string": "{{ 'x' * 10000000000 }}",
    "huge list": "{{ [0] * 100000000 }}",
    "huge number": "{{ 10 ** 100000000 }}",
    "range past the sandbox's cap": "{{ range(10 ** 12) | list }}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
}


@pytest.mark.parametrize("template", BOUNDS.values(), ids=BOUNDS.keys())
def test_a_template_that_would_hang_or_fill_memory_is_refused_in_bounded_time(tmp_path, template):
    task = load_yaml(task_file(tmp_path, template))
    began = time.perf_counter()
    with pytest.raises(TaskError, match=r"data.jsonl:1: template .* (refused by the sandbox|ran past|failed)"):
        task.items()
    assert time.perf_counter() - began < RENDER_SECONDS + 3


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


def test_python_yaml_tags_are_not_constructed(tmp_path):
    path = task_file(tmp_path, "{{ q }}", "metadata: !!python/object/apply:os.system ['touch PWNED']\n")
    with pytest.raises(TaskError, match=r"evil.yaml: not valid YAML"):
        load_yaml(path)
    assert not (tmp_path / "PWNED").exists()


def test_the_issues_yaml_leaves_no_trace_and_exits_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task_file(tmp_path, "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}{{q}}")
    args = ["eval", "--method", "zerotuning", "--param", "gamma=2", "--tasks", "evil.yaml", "--limit", "1"]
    result = CliRunner().invoke(app, [*args, "--output-path", "out"])
    assert result.exit_code == 2 and "is refused by the sandbox" in result.output and "Traceback" not in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.jsonl", "evil.yaml"]  # no PWNED, no out/
