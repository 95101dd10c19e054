"""The command line, through typer's runner: the real default model end to end, a local checkpoint
directory, user tasks, and clear failures."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from intervene.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def results_of(output_dir):
    (path,) = output_dir.glob("*/results.json")
    return json.loads(path.read_text()), path.parent


def test_methods_and_tasks_list_what_is_registered():
    result = invoke("methods")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names == ["act", "heads", "pai", "prune", "var", "vhr", "zerotuning"]
    result = invoke("tasks")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == [
        "cldr_currency",
        "cldr_language",
        "easy-vqa",
        "mmlu_dev",
        "pope-photos",
        "unanswerable_qa",
    ]


def test_eval_on_the_real_default_model(tmp_path):
    result = invoke(
        "eval", "--method", "act", "--param", "beta=0.5", "--tasks", "cldr_language,mmlu_dev,unanswerable_qa",
        "--limit", 6, "--batch-size", 4, "--device", "cpu", "--output-path", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document, run_dir = results_of(tmp_path)
    assert document["intervention"]["method"] == "act" and document["intervention"]["params"]["beta"] == 0.5
    assert document["config"]["model"] == "smollm2-135m" and document["seed"] == 1234
    assert {"intervene", "torch", "transformers"} <= set(document["versions"])
    expected = {"cldr_language": {"acc", "acc_norm"}, "mmlu_dev": {"acc"}}
    expected["unanswerable_qa"] = {"acc", "hallucination", "abstention"}
    assert {task: set(metrics) for task, metrics in document["results"].items()} == expected
    for task, metrics in document["results"].items():
        for metric in metrics.values():
            assert metric["n"] == 6
            assert metric["delta"] == pytest.approx(metric["intervened"] - metric["baseline"])
            assert metric["ci95"][0] - 1e-9 <= metric["delta"] <= metric["ci95"][1] + 1e-9
            assert 0 <= metric["p_value"] <= 1
        samples = (run_dir / f"samples_{task}.jsonl").read_text().splitlines()
        assert len(samples) == 6 and {"baseline", "intervened"} <= set(json.loads(samples[0]))
    assert "| cldr_language | acc | 6 |" in result.output


def test_eval_on_a_local_checkpoint_with_builtin_and_user_tasks(tmp_path, tiny_checkpoint):
    data = tmp_path / "facts.jsonl"
    data.write_text(
        json.dumps({"q": "Water is", "opts": ["wet", "dry"], "a": 0}) + "\n"
        + json.dumps({"q": "Fire is", "opts": ["cold", "hot"], "a": 1}) + "\n"
    )  # fmt: skip
    (tmp_path / "facts.yaml").write_text(
        "task: facts\ndata_files: {test: facts.jsonl}\ndoc_to_text: q\ndoc_to_choice: opts\ndoc_to_target: a\n"
    )
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"query": "Snow is", "choices": ["white", "black"], "gold": 0}) + "\n")
    for method, param in (("act", "beta=0.4"), ("zerotuning", "gamma=2")):
        result = invoke(
            "eval", "--model", tiny_checkpoint, "--method", method, "--param", param,
            "--tasks", f"cldr_language,mmlu_dev,unanswerable_qa,{tmp_path / 'facts.yaml'},{plain}", "--limit", 3,
            "--output-path", tmp_path / method,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        document, _ = results_of(tmp_path / method)
        assert document["results"]["facts"]["acc"]["n"] == 2 and document["results"]["plain"]["acc"]["n"] == 1
        assert document["results"]["unanswerable_qa"]["hallucination"]["n"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "actt"], "unknown method 'actt'; known methods: act, heads, pai, prune, var, vhr, zerotuning"),
        (["--method", "act", "--param", "beta=2"], "act: beta=2 is out of range"),
        (["--method", "act", "--param", "beta"], "--param 'beta' is not key=value"),
        ([], "give exactly one of --method NAME or --config FILE"),
        (["--method", "act", "--tasks", "nosuchtask"], "unknown task 'nosuchtask'"),
        (["--method", "act", "--tasks", "missing.jsonl"], "task file missing.jsonl does not exist"),
        (["--method", "act", "--model", "/nonexistent/model"], "cannot load model '/nonexistent/model'"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message_and_no_traceback(tmp_path, args, message):
    result = invoke("eval", "--tasks", "cldr_language", "--limit", 1, "--output-path", tmp_path, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"query": "a", "choices": ["x", "y"], "gold": 0}\n{"query": oops}\n', "broken.jsonl:2: not valid JSON"),
        ("", "broken.jsonl has no records"),
    ],
)
def test_a_broken_user_task_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "broken.jsonl"
    path.write_text(content)
    result = invoke("eval", "--method", "act", "--tasks", path, "--output-path", tmp_path)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_eval_uses_the_config_shipped_for_the_default_model(tmp_path):
    shipped = json.loads(
        (Path(__file__).parent.parent / "configs" / "smollm2-135m" / "act" / "config.json").read_text()
    )
    assert shipped["calibration"]["split"] == "calib"
    result = invoke("eval", "--method", "act", "--tasks", "cldr_language", "--limit", 2, "--output-path", tmp_path)
    assert result.exit_code == 0, result.output
    assert "using the act config calibrated for smollm2-135m that ships with intervene" in result.output
    document, _ = results_of(tmp_path)
    assert document["intervention"]["params"] == shipped["params"]


@pytest.mark.parametrize("stop_at", [3, 6])  # the scorer call that is killed: batch 2 baseline, batch 3 intervened
def test_an_interrupted_eval_resumes_to_the_same_results(tmp_path, tiny_checkpoint, monkeypatch, stop_at):
    from intervene.evals import scorers

    args = ["eval", "--model", tiny_checkpoint, "--method", "act", "--tasks", "cldr_currency,unanswerable_qa",
            "--limit", 10, "--batch-size", 3]  # fmt: skip
    assert invoke(*args, "--output-path", tmp_path / "whole").exit_code == 0
    whole, _ = results_of(tmp_path / "whole")

    score, calls = scorers.score, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return score(*a, **k)

    monkeypatch.setattr(scorers, "score", interrupted)
    result = invoke(*args, "--output-path", tmp_path / "cut")
    assert result.exit_code == 130 and "--resume" in result.output
    (run,) = (tmp_path / "cut").iterdir()
    assert not (run / "results.json").exists()  # nothing half-written
    with open(run / "samples_cldr_currency.jsonl", "a") as log:
        log.write('{"task": "cldr_currency", "ind')  # a line cut short by the kill
    monkeypatch.setattr(scorers, "score", score)
    assert invoke(*args, "--resume", run).exit_code == 0
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["results"] == whole["results"]
    samples = (run / "samples_cldr_currency.jsonl").read_text().splitlines()
    assert len(samples) == 10 and all(json.loads(line) for line in samples)


def test_resume_refuses_other_arguments_or_a_foreign_folder(tmp_path, tiny_checkpoint):
    args = ["eval", "--model", tiny_checkpoint, "--method", "act", "--tasks", "cldr_currency", "--limit", 2]
    assert invoke(*args, "--output-path", tmp_path).exit_code == 0
    _, run = results_of(tmp_path)
    result = invoke(*args[:-1], 3, "--resume", run)
    assert result.exit_code == 2 and "that run had other limit; repeat its exact arguments" in result.output
    result = invoke(*args, "--resume", tmp_path / "nowhere")
    assert result.exit_code == 2 and "no run.json of an intervene eval there" in result.output
