"""intervene inside lmms-eval: the `intervene` model class answers every image question of a local POPE-style task as
it would alone, at any lmms-eval batch size, under VAR and PAI on the tiny LLaVA."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # the task's data are local files

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager
from PIL import Image

from intervene.evals.lmms_eval_model import InterveneLMM, _greedy_settings
from intervene.evals.scorers import _image_inputs
from intervene.evals.tasks import DATA

TASK = "pope_photos_lmms"
ITEMS = 36  # more than the largest batch: batch 32 holds 32 rows and then 4
# Strong settings: the random tiny LLaVA has no massive activations for VAR's default tau to call sinks.
METHODS = {"var": "method=var,p_move=0.9,tau=1.0,min_image_mass=0.0", "pai": "method=pai,alpha=5.0"}
POPE_METRICS = ("accuracy", "precision", "recall", "f1_score", "yes_ratio")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on 2 shared cores torch's thread pool is many times slower, and the runs compared share it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """An lmms-eval task on local files: POPE's prompt, answers and metrics (lmms-eval's own pope utils) over the
    built-in pope-photos questions, each document naming its photo by path."""
    directory = tmp_path_factory.mktemp("lmms-eval-tasks")
    with (DATA / "pope-photos.test.jsonl").open() as source, (directory / "data.jsonl").open("w") as data:
        for line in list(source)[:ITEMS]:
            record = json.loads(line)
            document = {"question_id": record["question_id"], "question": record["text"], "answer": record["label"]}
            data.write(json.dumps({**document, "image": str(DATA / "pope-photos" / record["image"])}) + "\n")
    (directory / "utils.py").write_text(
        "from lmms_eval.tasks.pope.utils import *  # noqa: F403\nfrom PIL import Image\n\n\n"
        "def doc_to_visual(doc):\n    with Image.open(doc['image']) as image:\n        return [image.convert('RGB')]\n"
    )
    metrics = "".join(
        f"  - metric: pope_{m}\n    aggregation: !function utils.pope_aggregate_{m}\n    higher_is_better: true\n"
        for m in POPE_METRICS
    )
    (directory / "task.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'data.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.pope_doc_to_text\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 8\n  temperature: 0\n  top_p: 1.0\n  num_beams: 1\n  do_sample: false\n"
        f"process_results: !function utils.pope_process_results\nmetric_list:\n{metrics}"
        "lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ''\n"
        '    post_prompt: "\\nAnswer the question using a single word or phrase."\n'
    )
    return directory


@pytest.fixture(scope="module")
def tasks(task_dir):
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def evaluate(tasks, model_args: str, batch_size: int) -> tuple[dict, list[str]]:
    """lmms-eval's results and the answer to each document, in document order."""
    results = simple_evaluate(
        model="intervene", model_args=model_args, tasks=[TASK], batch_size=batch_size, task_manager=tasks
    )
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    return results, [sample["filtered_resps"][0] for sample in samples]


def scores(results: dict) -> dict:
    return {name: value for name, value in results["results"][TASK].items() if "stderr" not in name}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_answer_is_the_same_at_every_batch_size(method, tasks):
    args = f"pretrained=tiny-llava,{METHODS[method]}"
    runs = {size: evaluate(tasks, args, size) for size in (1, 8, 32)}
    results, alone = runs[1]
    assert len(alone) == ITEMS and len(set(alone)) > 1, alone  # the answers differ between items
    for size in (8, 32):
        assert runs[size][1] == alone, (
            f"batch {size}: {sum(a != b for a, b in zip(runs[size][1], alone, strict=True))} differ"
        )
        assert scores(runs[size][0]) == scores(results)
    assert results["config"]["model_args"] == args  # lmms-eval's record of the intervention


@pytest.mark.parametrize("method", list(METHODS))
def test_the_intervention_changes_the_logits_of_the_model_lmms_eval_runs(method):
    params = dict(item.split("=") for item in METHODS[method].split(",")[1:])
    lm = InterveneLMM(pretrained="tiny-llava", method=method, **{k: float(v) for k, v in params.items()})
    with Image.open(DATA / "pope-photos" / "coffee.jpg") as image:
        item = SimpleNamespace(image=image.convert("RGB"), query="Is there a cup in the image?")
    inputs = _image_inputs([item], lm.processor, lm.model.dtype)
    with torch.no_grad():
        intervened = lm.model(**inputs).logits[0, -1]  # [V]: the row that predicts the answer
        lm.intervention.enabled = False
        plain = lm.model(**inputs).logits[0, -1]
    assert (intervened - plain).abs().max() > 1e-3, "the intervention changed nothing"  # float noise: under 1e-5
    recorded = lm.get_model_info()["intervention"]
    assert recorded["method"] == method and recorded["model"]["name_or_path"] == "tiny-llava"
    assert recorded["params"]["layers"] == {"var": [2, 3, 4], "pai": [2, 3, 4, 5]}[method]  # "auto", resolved
    json.dumps(recorded)


def test_unedited_it_answers_as_the_intervention_switched_off_and_pai_changes_answers(tasks):
    """`method` left out, the model runs as loaded: its answers are those of PAI with alpha 0, not alpha 5's."""
    _, plain = evaluate(tasks, "pretrained=tiny-llava", 8)
    _, neutral = evaluate(tasks, "pretrained=tiny-llava,method=pai,alpha=0.0", 8)
    _, amplified = evaluate(tasks, f"pretrained=tiny-llava,{METHODS['pai']}", 8)
    assert plain == neutral
    assert sum(a != b for a, b in zip(amplified, plain, strict=True)) > 0


def test_a_language_model_and_options_of_neither_kind_are_refused_by_name(tasks):
    with pytest.raises(ValueError, match=r"smollm2-135m is a language model; the intervene lmms-eval model runs"):
        simple_evaluate(model="intervene", model_args="pretrained=smollm2-135m", tasks=[TASK], task_manager=tasks)
    with pytest.raises(ValueError, match=r"model_args alpha are not options of the intervene model"):
        InterveneLMM(pretrained="tiny-llava", alpha=0.5)
    with pytest.raises(ValueError, match=r"takes a number from 1 up as batch_size, not 'auto'"):
        InterveneLMM(pretrained="tiny-llava", batch_size="auto")


def test_generation_settings_are_honoured_or_refused_by_name():
    pope = {"max_new_tokens": 128, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    assert _greedy_settings(pope) == (128, [])
    assert _greedy_settings({"until": "\n\n"}) == (1024, ["\n\n"])
    with pytest.raises(ValueError, match=r"do_sample=False, temperature=0.7, num_beams=1: the intervene model decodes"):
        _greedy_settings({"temperature": 0.7})
    with pytest.raises(ValueError, match=r"generation_kwargs image_aspect_ratio, repetition_penalty are not honoured"):
        _greedy_settings({"repetition_penalty": 1.1, "image_aspect_ratio": "pad"})


def test_lmms_eval_finds_the_model_through_its_entry_point_and_command_line(task_dir, tasks, tmp_path):
    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "intervene"]
    assert entry.load()().simple_class_path == "intervene.evals.lmms_eval_model.InterveneLMM"
    assert get_model("intervene") is InterveneLMM
    args = "pretrained=tiny-llava,method=pai,alpha=5.0"
    command = [
        str(Path(sys.executable).parent / "lmms-eval"), "--model", "intervene", "--model_args", args,
        "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "8", "--limit", "8",
        "--output_path", str(tmp_path), "--log_samples",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=environment)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'intervene: {"schema": 1, "method": "pai", "params": {"alpha": 5.0' in run.stdout + run.stderr
    [written] = tmp_path.rglob("*_results.json")
    document = json.loads(written.read_text())
    assert document["config"]["model_args"] == args
    [samples] = tmp_path.rglob(f"*_samples_{TASK}.jsonl")
    logged = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    answers = [sample["filtered_resps"] for sample in logged]  # the file holds the first (only) filtered answer
    assert answers == evaluate(tasks, args, 1)[1][:8]
