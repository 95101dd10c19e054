"""A fixed corpus of malformed inputs fed to the task loader, the config loader and the CLI: each must end
in a clear error (exit code 2, a message, no traceback) and leave no results file behind."""

import json

import pytest
from typer.testing import CliRunner

from intervene.cli import app

GOOD = {"query": "Snow is", "choices": ["white", "black"], "gold": 0}

BAD_TASK_FILES = {
    "empty.jsonl": "",
    "not_json.jsonl": "this is not json\n",
    "cut_short.jsonl": json.dumps(GOOD) + "\n" + '{"query": "Fire is", "choi\n',
    "a_list.jsonl": "[1, 2, 3]\n",
    "no_choices.jsonl": json.dumps({"query": "Snow is", "gold": 0}) + "\n",
    "choices_not_a_list.jsonl": json.dumps({**GOOD, "choices": "white"}) + "\n",
    "gold_out_of_range.jsonl": json.dumps({**GOOD, "gold": 5}) + "\n",
    "gold_not_a_choice.jsonl": json.dumps({**GOOD, "gold": "purple"}) + "\n",  # a gold string must name a choice
    "binary.jsonl": b"\xff\xfe\x00\x01garbage\n",
}
BAD_YAML = {
    "broken.yaml": "task: [unclosed\n",
    "a_list.yaml": "- task: x\n",
    "bad_type.yaml": "task: x\noutput_type: essay\ndata_files: {test: data.jsonl}\n",
    "missing_data.yaml": "task: x\ndata_files: {test: nowhere.jsonl}\n",
}
BAD_CONFIGS = {
    "not_json.json": "{method: act",
    "a_list.json": "[]",
    "no_method.json": json.dumps({"params": {}}),
    "unknown_method.json": json.dumps({"method": "actt", "params": {}}),
    "bad_value.json": json.dumps({"method": "act", "params": {"beta": "high"}}),
    "nan.json": '{"method": "zerotuning", "params": {"gamma": NaN}}',
    "future.json": json.dumps({"schema": 99, "method": "act", "params": {}}),
    "other_model.json": json.dumps(
        {"method": "act", "params": {}, "model": {"name_or_path": "big", "num_layers": 80, "num_heads": 64}}
    ),
}


def check_clean_failure(result, output_path):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not list(output_path.rglob("results.json"))


@pytest.mark.parametrize("name", list(BAD_TASK_FILES) + list(BAD_YAML))
def test_malformed_tasks(tmp_path, tiny_checkpoint, name):
    (tmp_path / "data.jsonl").write_text(json.dumps(GOOD) + "\n")
    content = {**BAD_TASK_FILES, **BAD_YAML}[name]
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    result = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_checkpoint), "--method", "act", "--tasks", str(path),
              "--output-path", str(tmp_path / "out")],
    )  # fmt: skip
    check_clean_failure(result, tmp_path / "out")
    assert name in result.output or "nowhere.jsonl" in result.output  # the message names the file


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_malformed_configs(tmp_path, tiny_checkpoint, name):
    path = tmp_path / name
    path.write_text(BAD_CONFIGS[name])
    result = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_checkpoint), "--config", str(path), "--tasks", "cldr_currency",
              "--limit", "2", "--output-path", str(tmp_path / "out")],
    )  # fmt: skip
    check_clean_failure(result, tmp_path / "out")


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "act", "--param", "beta"],
        ["--method", "act", "--param", "beta=abc"],
        ["--method", "act", "--param", "beta=7"],
        ["--method", "act", "--limit", "0"],
        ["--method", "act", "--batch-size", "-1"],
        ["--method", "act", "--dtype", "float8"],
        ["--method", "act", "--split", "nonesuch"],
        ["--method", "zerotuning", "--param", "gamma=NaN"],  # the bias log(gamma) of a user's number
        ["--method", "zerotuning", "--param", "gamma=Infinity"],
        ["--method", "heads", "--param", 'scales={"1": {"0": NaN}}'],
        ["--method", "var"],  # a VLM method on a text model
        ["--method", "act", "--tasks", "pope-photos"],  # an image task on a text model
    ],
)
def test_malformed_command_lines(tmp_path, tiny_checkpoint, args):
    tasks = [] if "--tasks" in args else ["--tasks", "cldr_currency"]
    command = ["eval", "--model", str(tiny_checkpoint), *args, *tasks, "--output-path", str(tmp_path / "out")]
    check_clean_failure(CliRunner().invoke(app, command), tmp_path / "out")


def test_a_prompt_longer_than_the_context(tmp_path, tiny_checkpoint):
    long = {**GOOD, "query": "word " * 1100}  # the tiny checkpoint has 1024 positions
    (tmp_path / "long.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(long) + "\n")
    command = ["eval", "--model", str(tiny_checkpoint), "--method", "act", "--tasks", str(tmp_path / "long.jsonl"),
               "--output-path", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(app, command)
    check_clean_failure(result, tmp_path / "out")
    assert "task 'long', items [0, 1]: a prompt of" in result.output
    assert "is longer than the model's context of 1024 tokens" in result.output


@pytest.mark.parametrize(
    "trend", [{"weights": [1.0, float("nan")]}, {"weights": [0.0, 0.0]}, {"mu": float("inf"), "sigma": 1.0}]
)
def test_a_positional_trend_with_nan_or_inf_is_refused(trend):
    from intervene.interventions.prune import Prune

    with pytest.raises(ValueError, match=r"needs trend=.*finite"):
        Prune(debias="position", trend=trend)
