"""The command line, through typer's runner: the real default model end to end, a local checkpoint
directory, user tasks, and clear failures."""

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
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
    assert names == ["act", "causalmm", "heads", "pai", "prune", "var", "vcd", "vhr", "zerotuning"]
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


def test_eval_runs_a_task_that_samples_with_several_seeds(tmp_path, tiny_checkpoint):
    records = [{"q": f"Language of country {n}?", "answer": "French"} for n in range(3)]
    (tmp_path / "langs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (tmp_path / "langs.yaml").write_text(
        "task: langs\ndata_files: {test: langs.jsonl}\noutput_type: generate_until\ndoc_to_text: q\n"
        "doc_to_target: answer\ngeneration_kwargs: {do_sample: true, temperature: 2.0, max_gen_toks: 4}\n"
    )
    common = ["eval", "--model", tiny_checkpoint, "--method", "zerotuning", "--param", "gamma=2", "--limit", 3]
    result = invoke(
        *common, "--tasks", f"{tmp_path / 'langs.yaml'},cldr_language", "--seed", 5, "--seeds", 2,
        "--output-path", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document, run_dir = results_of(tmp_path / "out")
    assert document["seed"] == 5 and document["seeds"] == 2
    assert set(document["results"]["langs"]["acc"]["seeds"]) == {"5", "6"}
    assert "seeds" not in document["results"]["cldr_language"]["acc"]  # greedy: one run
    logs = {path.name for path in run_dir.glob("samples_*.jsonl")}
    assert logs == {"samples_langs.seed5.jsonl", "samples_langs.seed6.jsonl", "samples_cldr_language.jsonl"}
    assert "| langs (2 seeds) | acc | 3 |" in result.output
    result = invoke(*common, "--tasks", "cldr_language", "--seeds", 2, "--output-path", tmp_path / "greedy")
    assert result.exit_code == 2 and "--seeds 2 repeats the tasks that sample, and none of cldr_language" in (
        result.output
    )


def test_lm_evals_underscore_spellings_are_the_same_options(tmp_path, tiny_checkpoint):
    runs = {}
    for spelling in ("-", "_"):
        batch, bos, output = (
            f"--{name.replace('-', spelling)}" for name in ("batch-size", "add-bos-token", "output-path")
        )
        result = invoke(
            "eval", "--model", tiny_checkpoint, "--method", "zerotuning", "--param", "gamma=2", "--tasks",
            "cldr_language", "--limit", 3, batch, 2, bos, output, tmp_path / spelling,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[spelling], _ = results_of(tmp_path / spelling)
    for document in runs.values():
        assert document["config"]["batch_size"] == 2 and document["config"]["add_bos_token"] is True
    assert runs["_"]["results"] == runs["-"]["results"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--method", "actt"],
            "unknown method 'actt'; known methods: act, causalmm, heads, pai, prune, var, vcd, vhr, zerotuning",
        ),
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


def test_param_overrides_the_shipped_config_and_uncalibrated_runs_the_methods_defaults(tmp_path):
    shipped = json.loads(
        (Path(__file__).parent.parent / "configs" / "smollm2-135m" / "act" / "config.json").read_text()
    )
    common = ("--tasks", "cldr_language", "--limit", 2)
    result = invoke("eval", "--method", "act", "--param", "beta=0.6", *common, "--output-path", tmp_path / "over")
    assert result.exit_code == 0, result.output
    assert "calibrated for smollm2-135m that ships with intervene, with --param beta=0.6 over its" in result.output
    assert "smollm2-135m · act (config " in result.output and ", --param over it)" in result.output
    document, _ = results_of(tmp_path / "over")
    assert document["intervention"]["params"] == {**shipped["params"], "beta": 0.6}  # the shipped heads, beta 0.6
    assert document["intervention"]["config_file"].endswith("configs/smollm2-135m/act/config.json")

    result = invoke("eval", "--method", "act", "--uncalibrated", *common, "--output-path", tmp_path / "defaults")
    assert result.exit_code == 0, result.output
    assert "ships with intervene" not in result.output
    document, _ = results_of(tmp_path / "defaults")
    assert document["intervention"]["params"]["heads"] == "all" and document["intervention"]["config_file"] is None

    shipped_path = Path(__file__).parent.parent / "configs" / "smollm2-135m" / "act" / "config.json"
    result = invoke("eval", "--config", shipped_path, "--uncalibrated", *common, "--output-path", tmp_path / "both")
    assert result.exit_code == 2 and "--uncalibrated goes with --method" in result.output


@pytest.mark.parametrize("stop_at", [3, 6])  # the scorer call that is killed: batch 2 baseline, batch 3 intervened
def test_an_interrupted_eval_resumes_to_the_same_results(tmp_path, tiny_checkpoint, monkeypatch, stop_at):
    from intervene.evals import runner, scorers

    ticks = itertools.count()  # a clock on which every variant of every batch takes one second
    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    args = ["eval", "--model", tiny_checkpoint, "--method", "act", "--tasks", "cldr_currency,unanswerable_qa",
            "--limit", 10, "--batch-size", 3]  # fmt: skip
    assert invoke(*args, "--output-path", tmp_path / "whole").exit_code == 0
    whole, _ = results_of(tmp_path / "whole")
    assert whole["timing"]["cldr_currency"]["baseline_s_per_item"] == 4 / 10  # 4 batches of 10 items

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
    assert resumed["timing"] == whole["timing"]  # s/item counts the batches of the interrupted run too
    samples = (run / "samples_cldr_currency.jsonl").read_text().splitlines()
    assert len(samples) == 10 and all(json.loads(line) for line in samples)


def test_resume_refuses_other_arguments_or_a_foreign_folder(tmp_path, tiny_checkpoint):
    args = ["eval", "--model", tiny_checkpoint, "--method", "act", "--tasks", "cldr_currency", "--limit", 2]
    assert invoke(*args, "--output-path", tmp_path).exit_code == 0
    _, run = results_of(tmp_path)
    result = invoke(*args[:-1], 3, "--resume", run)
    assert result.exit_code == 2 and "that run had other settings (limit 2 there, 3 now); repeat its" in result.output
    result = invoke(*args, "--dtype", "bfloat16", "--resume", run)  # would mix float32 and bfloat16 scores
    assert result.exit_code == 2 and '(dtype "float32" there, "bfloat16" now)' in result.output
    assert json.loads((run / "run.json").read_text())["dtype"] == "float32"
    result = invoke(*args, "--add-bos-token", "--resume", run)  # would mix prompts with and without a BOS
    assert result.exit_code == 2 and "(add_bos_token false there, true now)" in result.output
    result = invoke(*args, "--resume", tmp_path / "nowhere")
    assert result.exit_code == 2 and "no run.json of an intervene eval there" in result.output


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, tiny_checkpoint, monkeypatch):
    import datetime

    from intervene.evals import evaluator

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2030, 1, 1, tzinfo=tz)

    monkeypatch.setattr(evaluator, "datetime", Frozen)
    args = ["eval", "--model", tiny_checkpoint, "--tasks", "cldr_currency", "--limit", 2, "--output-path", tmp_path]
    assert invoke(*args, "--method", "act", "--param", "beta=0.2").exit_code == 0
    first = (tmp_path / "2030-01-01T00-00-00" / "results.json").read_text()
    assert invoke(*args, "--method", "act", "--param", "beta=0.9").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2030-01-01T00-00-00", "2030-01-01T00-00-00-2"]
    assert (tmp_path / "2030-01-01T00-00-00" / "results.json").read_text() == first  # not overwritten
    second = json.loads((tmp_path / "2030-01-01T00-00-00-2" / "results.json").read_text())
    assert second["intervention"]["params"]["beta"] == 0.9


def test_two_task_files_of_one_name_are_refused(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "data.jsonl").write_text(json.dumps({"query": "Q", "choices": ["x", "y"], "gold": 0}))
    first, second = tmp_path / "a" / "data.jsonl", tmp_path / "b" / "data.jsonl"
    result = invoke("eval", "--method", "act", "--tasks", f"{first},{second}", "--output-path", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--tasks {first} and {second} are both task 'data'" in result.output
    assert "give it a YAML with its own `task:` name" in result.output and not (tmp_path / "out").exists()


def test_data_file_flags_with_only_builtin_tasks_are_refused(tmp_path):
    result = invoke(
        "eval", "--method", "act", "--tasks", "cldr_currency", "--doc-to-text", "q", "--output-path", tmp_path
    )
    assert result.exit_code == 2
    assert "--doc-to-text say how to read a data file, and cldr_currency are built-in tasks" in result.output


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad input was found")


@pytest.mark.parametrize("command", ["eval", "calibrate", "inspect"])
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "nonsense"], "--device 'nonsense' is not a device; give cpu, cuda, cuda:1"),
        (["--output-path", "A_FILE"], "is a file, not a folder; give a folder path"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "finds no accelerator here; give --device cpu")]),
)
def test_a_bad_device_or_output_path_fails_before_the_model_loads(tmp_path, monkeypatch, command, extra, message):
    import intervene

    monkeypatch.setattr(intervene, "load_model", refuse_to_load)
    (tmp_path / "a_file").write_text("")
    extra = [str(tmp_path / "a_file") if arg == "A_FILE" else arg for arg in extra]
    args = {"eval": ["--method", "act", "--tasks", "cldr_currency"], "calibrate": ["--method", "act"]}
    args = [command, *args.get(command, ["--prompt", "Hello"]), *extra]
    result = invoke(*args, *([] if "--output-path" in extra else ["--output-path", tmp_path / "out"]))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert (tmp_path / "a_file").read_text() == ""


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_ctrl_c_while_the_model_loads_stops_cleanly(tmp_path, monkeypatch, command):
    import intervene

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(intervene, "load_model", interrupted)
    args = ["--method", "act", "--tasks", "cldr_currency"] if command == "eval" else ["--prompt", "Hello"]
    result = invoke(command, *args, "--output-path", tmp_path)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("interrupted before")


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_a_config_that_is_not_json_names_its_file(tmp_path, command):
    config = tmp_path / "mine.json"
    config.write_text("{bad")
    args = ["--tasks", "cldr_currency"] if command == "eval" else ["--prompt", "Hello"]
    result = invoke(command, "--config", config, *args, "--output-path", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--config {config}: not valid JSON (Expecting property name" in result.output
    assert "give a config written by `intervene calibrate` or `handle.save`" in result.output


def test_the_command_line_is_one_call_of_evals_run(tmp_path, tiny_checkpoint):
    """`intervene eval` parses flags into an EvalSpec and calls `run`; the same spec in Python gives the same
    document, which is the one written to results.json."""
    from intervene.evals import EvalSpec, run

    args = ["--model", tiny_checkpoint, "--method", "act", "--param", "beta=0.2", "--tasks", "cldr_currency"]
    assert invoke("eval", *args, "--limit", 3, "--output-path", tmp_path / "cli").exit_code == 0
    from_cli, _ = results_of(tmp_path / "cli")
    spec = EvalSpec(model=str(tiny_checkpoint), method="act", params={"beta": 0.2}, tasks=["cldr_currency"], limit=3,
                    output_path=tmp_path / "py")  # fmt: skip
    document = run(spec, say=lambda text: None)
    written, run_dir = results_of(tmp_path / "py")
    assert document == written and document["config"]["output_path"] == str(run_dir / "results.json")
    assert document["results"] == from_cli["results"]
    assert run({**spec.__dict__, "output_path": tmp_path / "dict"}, say=print)["results"] == document["results"]


def test_an_output_path_ending_in_json_is_the_results_file(tmp_path, tiny_checkpoint):
    args = ["eval", "--model", tiny_checkpoint, "--method", "act", "--tasks", "cldr_currency", "--limit", 2]
    result = invoke(*args, "--output_path", tmp_path / "runs" / "act.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "runs" / "act.json").read_text())
    assert document["config"]["output_path"] == str(tmp_path / "runs" / "act.json")
    assert f"results: {tmp_path / 'runs' / 'act.json'}" in result.output
    (run_dir,) = [path for path in (tmp_path / "runs").iterdir() if path.is_dir()]  # the samples' folder beside it
    assert (run_dir / "samples_cldr_currency.jsonl").is_file() and not (run_dir / "results.json").exists()
    (tmp_path / "taken.json").mkdir()
    result = invoke(*args, "--output-path", tmp_path / "taken.json")
    assert result.exit_code == 2 and "is a folder; a path ending in .json names the results file" in result.output


def test_lm_evals_model_args_spell_the_model_the_method_and_its_parameters(tmp_path, tiny_checkpoint):
    common = ["eval", "--tasks", "cldr_currency", "--limit", 2, "--log_samples"]
    spelled = f"pretrained={tiny_checkpoint},method=act,beta=0.2,add_bos_token=False"
    assert invoke(*common, "--model_args", spelled, "--output-path", tmp_path / "args").exit_code == 0
    args = ["--model", tiny_checkpoint, "--method", "act", "--param", "beta=0.2"]
    assert invoke(*common, *args, "--output-path", tmp_path / "flags").exit_code == 0
    (a, _), (b, _) = results_of(tmp_path / "args"), results_of(tmp_path / "flags")
    assert (
        a["results"] == b["results"]
        and a["intervention"] == b["intervention"]
        and a["config"]["model"] == b["config"]["model"]
    )
    result = invoke(*common, "--model_args", spelled, "--method", "zerotuning", "--output-path", tmp_path / "both")
    assert result.exit_code == 2 and "--model_args method=act and --method zerotuning both say it" in result.output
    result = invoke(*common, "--model_args", spelled, "--num_fewshot", 2, "--output-path", tmp_path / "shots")
    assert result.exit_code == 0, result.output
    shots, run_dir = results_of(tmp_path / "shots")
    assert shots["config"]["task_settings"]["cldr_currency"]["num_fewshot"] == 2
    (sample, *_) = [json.loads(line) for line in (run_dir / "samples_cldr_currency.jsonl").read_text().splitlines()]
    assert sample["query"].count("Answer:") == 3  # two solved examples, then the question
