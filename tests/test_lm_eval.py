"""intervene inside lm-eval: the `intervene` model class scores every item as it would be scored alone, at any
lm-eval batch size, and unedited it gives lm-eval's own HF model's scores item for item."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import intervene
from intervene.evals.lm_eval_model import InterveneLM
from intervene.evals.tasks import DATA

TASK = "cldr_language_lm_eval"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A local lm-eval multiple-choice task: 12 items of the built-in cldr_language test split."""
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    source = DATA / "cldr_language.test.jsonl"
    (directory / "data.jsonl").write_text("".join(source.read_text().splitlines(keepends=True)[:12]))
    (directory / "task.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return directory


@pytest.fixture(scope="module")
def tasks(task_dir):
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def evaluate(model, tasks, batch_size: int, **kwargs):
    """lm-eval's results and, per item, the log-likelihood of each choice and the item's acc."""
    results = lm_eval.simple_evaluate(
        model=model, tasks=[TASK], batch_size=batch_size, task_manager=tasks, log_samples=True, **kwargs
    )
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    scores = torch.tensor([[ll for ll, _ in sample["filtered_resps"]] for sample in samples])  # [items, choices]
    return results, scores, [sample["acc"] for sample in samples]


@pytest.mark.parametrize(
    "model_args",
    ["method=act", "method=zerotuning,gamma=4.0", "config={heads}"],
    ids=["act", "zerotuning", "heads"],
)
def test_every_item_scores_the_same_at_every_batch_size(model_args, tasks, tiny_checkpoint, tmp_path):
    heads = tmp_path / "heads.json"
    model, _ = intervene.load_model(str(tiny_checkpoint), device="cpu")
    with intervene.apply(model, "heads", scales={1: {0: 0.0, 2: 3.0}, 3: {1: 2.0}}) as handle:
        handle.save(heads)
    args = f"pretrained={tiny_checkpoint},{model_args.format(heads=heads)}"
    runs = {size: evaluate("intervene", tasks, size, model_args=args) for size in (1, 8, 32)}
    _, alone, acc = runs[1]
    for size in (8, 32):
        torch.testing.assert_close(runs[size][1], alone, atol=1e-4, rtol=1e-5)  # float rounding of other shapes
        assert runs[size][2] == acc
    plain = evaluate("intervene", tasks, 8, model_args=f"pretrained={tiny_checkpoint}")[1]
    assert (alone - plain).abs().max() > 1e-2, "the intervention changed nothing"


def test_unedited_it_scores_as_lm_evals_own_hf_model(tasks, tiny_checkpoint):
    model, tokenizer = intervene.load_model(str(tiny_checkpoint), device="cpu")
    _, expected, expected_acc = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks, 4)
    _, scores, acc = evaluate("intervene", tasks, 4, model_args=f"pretrained={tiny_checkpoint}")
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert acc == expected_acc


def test_the_default_model_with_act_and_its_record_in_lm_evals_results(tasks):
    results, scores, acc = evaluate("intervene", tasks, 8, model_args="pretrained=smollm2-135m,method=act,beta=0.5")
    _, alone, acc_alone = evaluate("intervene", tasks, 1, model_args="pretrained=smollm2-135m,method=act,beta=0.5")
    torch.testing.assert_close(scores, alone, atol=1e-4, rtol=1e-5)
    assert acc == acc_alone
    recorded = results["config"]["intervention"]
    assert recorded["method"] == "act" and recorded["params"]["beta"] == 0.5
    assert recorded["params"]["layers"] == list(range(2, 29))  # "auto" resolved for the 30-layer model
    assert results["config"]["model_args"] == "pretrained=smollm2-135m,method=act,beta=0.5"
    json.dumps(results["config"]["intervention"])  # lm-eval writes it to its results file


def test_options_that_are_neither_the_models_nor_a_methods_are_refused_by_name(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"model_args beta are not options of the intervene model"):
        InterveneLM(pretrained=str(tiny_checkpoint), beta=0.4)
    with pytest.raises(ValueError, match=r"unknown parameter 'alpha' for method 'act'"):
        InterveneLM(pretrained=str(tiny_checkpoint), method="act", alpha=0.2)
    with pytest.raises(ValueError, match=r"tiny-llava is a vision-language model; the intervene lm-eval model runs"):
        InterveneLM(pretrained="tiny-llava", method="pai")


def test_the_lm_eval_command_line_runs_the_intervene_model(task_dir, tasks, tiny_checkpoint, tmp_path):
    args = f"pretrained={tiny_checkpoint},method=act"
    command = [
        str(Path(sys.executable).parent / "intervene"),
        "lm-eval",
        "--model",
        "intervene",
        "--model_args",
        args,
        "--tasks",
        TASK,
        "--include_path",
        str(task_dir),
        "--batch_size",
        "4",
        "--output_path",
        str(tmp_path),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    [written] = tmp_path.rglob("results_*.json")
    document = json.loads(written.read_text())
    assert document["config"]["intervention"]["method"] == "act"
    expected, _, _ = evaluate("intervene", tasks, 4, model_args=args)
    assert document["results"][TASK]["acc,none"] == expected["results"][TASK]["acc,none"]


def test_intervene_eval_pairs_an_lm_eval_task_whose_baseline_is_lm_evals_own(
    task_dir, tasks, tiny_checkpoint, tmp_path
):
    from typer.testing import CliRunner

    from intervene.cli import app

    args = [
        "eval",
        "--model",
        str(tiny_checkpoint),
        "--method",
        "act",
        "--tasks",
        TASK,
        "--include-path",
        str(task_dir),
    ]
    result = CliRunner().invoke(app, [*args, "--batch-size", "4", "--output-path", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.iterdir()
    document = json.loads((run / "results.json").read_text())
    assert document["config"]["harness"] == "lm-eval" and document["intervention"]["method"] == "act"
    assert (run / "lm_eval_baseline.json").is_file() and (run / "lm_eval_intervened.json").is_file()
    samples = [json.loads(line) for line in (run / f"samples_{TASK}.jsonl").read_text().splitlines()]
    model, tokenizer = intervene.load_model(str(tiny_checkpoint), device="cpu")
    _, _, hf_acc = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks, 4)
    _, _, act_acc = evaluate("intervene", tasks, 4, model_args=f"pretrained={tiny_checkpoint},method=act")
    assert [s["baseline"]["metrics"]["acc"] for s in samples] == hf_acc  # item for item
    assert [s["intervened"]["metrics"]["acc"] for s in samples] == act_acc
    metrics = document["results"][TASK]
    assert metrics["acc"]["n"] == 12 and metrics["acc"]["baseline"] == sum(hf_acc) / 12
    assert metrics["acc"]["delta"] == (sum(act_acc) - sum(hf_acc)) / 12

    result = CliRunner().invoke(app, [*args, "--resume", str(run)])
    assert result.exit_code == 2 and "--resume: not for lm-eval tasks" in result.output
    result = CliRunner().invoke(app, [*args, "--seeds", "3"])
    assert result.exit_code == 2 and "--seeds: not for lm-eval tasks" in result.output
    result = CliRunner().invoke(app, [*args[:5], "--tasks", "no_such_task", "--include-path", str(task_dir)])
    assert result.exit_code == 2 and "unknown task 'no_such_task': not a built-in task" in result.output
    result = CliRunner().invoke(app, [*args[:5], "--tasks", f"cldr_language,{TASK}", "--include-path", str(task_dir)])
    assert result.exit_code == 2 and f"run intervene's own tasks and lm-eval's ({TASK}) separately" in result.output


def test_intervene_eval_and_lm_eval_score_every_item_alike_under_act(task_dir, tasks, tiny_checkpoint):
    """Both harnesses give the model lm-eval's input (context and continuation without its last token), which
    is all that ACT's sink detection sees, so an ACT run scores each item alike in either harness."""
    from intervene.evals import scorers
    from intervene.evals.tasks import Task

    task = Task(name=TASK, data_files={"test": str(task_dir / "data.jsonl")})
    items = task.items()
    model, tokenizer = intervene.load_model(str(tiny_checkpoint), device="cpu")
    with intervene.apply(model, "act"):
        ours = [result["loglikelihoods"] for result in scorers.score(task, items, model, tokenizer)]
    _, theirs, _ = evaluate("intervene", tasks, 4, model_args=f"pretrained={tiny_checkpoint},method=act")
    torch.testing.assert_close(torch.tensor(ours), theirs, atol=1e-4, rtol=1e-5)
    unedited = torch.tensor([r["loglikelihoods"] for r in scorers.score(task, items, model, tokenizer)])
    assert (unedited - theirs).abs().max() > 1e-2, "ACT changed nothing"


def test_a_config_is_never_scored_on_the_lm_eval_data_it_was_calibrated_on(task_dir, tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from intervene.cli import app

    model, _ = intervene.load_model(str(tiny_checkpoint), device="cpu")
    with intervene.apply(model, "act", beta=0.3) as handle:
        handle.save(tmp_path / "act.json")
    document = json.loads((tmp_path / "act.json").read_text())
    document["calibration"] = {"split": "calib", "tasks": {"mine": {"files": str(task_dir / "data.jsonl")}}}
    (tmp_path / "act.json").write_text(json.dumps(document))
    args = ["eval", "--model", str(tiny_checkpoint), "--config", str(tmp_path / "act.json"), "--tasks", TASK]
    result = CliRunner().invoke(app, [*args, "--include-path", str(task_dir), "--output-path", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert (
        f"calibrated on {task_dir / 'data.jsonl'}, which is data that lm-eval scores for task '{TASK}'" in result.output
    )
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_num_fewshot_reaches_lm_eval(task_dir, tiny_checkpoint, tmp_path):
    from intervene.evals import EvalSpec, run

    spec = EvalSpec(model=str(tiny_checkpoint), method="act", tasks=[TASK], include_path=task_dir, limit=3,
                    num_fewshot=2, output_path=tmp_path / "results.json")  # fmt: skip
    document = run(spec, say=lambda text: None)
    assert document["config"]["num_fewshot"] == 2
    intervened = json.loads((tmp_path / document["date"] / "lm_eval_intervened.json").read_text())
    assert intervened["n-shot"][TASK] == 2 and intervened["configs"][TASK]["num_fewshot"] == 2
