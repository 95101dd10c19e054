"""Image tasks, the POPE and CHAIR scorers against hand-computed values on fixture files in the public
formats (tests/data/vlm), the built-in image tasks, the tiny random LLaVA, and the CLI end to end."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

import intervene
from intervene.cli import app
from intervene.evals import chair, runner, scorers, stats
from intervene.evals.model import is_vision_language, smoke_test_warning
from intervene.evals.tasks import Task, TaskError, builtin_tasks, resolve_task

DATA = Path(__file__).parent / "data" / "vlm"
VISION_PROCESSOR = SimpleNamespace(image_processor=object())  # what `score` checks before an image task


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_vlm():
    return intervene.load_model("tiny-llava", device="cpu")


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory, tiny_vlm):
    """The built-in tiny-llava written to a folder the way the README says: a local VLM checkpoint."""
    directory = tmp_path_factory.mktemp("tiny-vlm")
    model, processor = tiny_vlm
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------- POPE

# Fixture answers: (image, question) -> what the model "said" before and after. Labels: y y n y n n y n.
POPE_BEFORE = [
    "Yes",  # yes  -> TP
    "No, there is not.",  # yes  -> FN
    "Yes, there is a cat.",  # no   -> FP
    "There is no cat in the image.",  # yes  -> FN
    "Yes",  # no   -> FP
    "Yes. There is no dog.",  # no   -> FP: only the first sentence counts
    "yes",  # yes  -> TP
    "I do not see a bus.",  # no   -> TN
]
POPE_AFTER = ["Yes", "Yes", "No", "Yes", "No", "No", "Yes", "No"]  # every answer right


@pytest.mark.parametrize(
    "output, answer",
    [
        ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("No, there is no dog.", "no"), ("Yes, there is a dog.", "yes"),
        ("There is not a dog", "no"), ("Yes. There is no dog.", "yes"), ("Nope", "yes"), ("", "yes"),
        ("NO", "yes"),  # POPE's rule matches "No"/"no" exactly, as the published numbers were computed
    ],
)  # fmt: skip
def test_pope_answer_rule(output, answer):
    assert scorers.pope_answer(output) == answer


def test_a_pope_question_file_loads_as_it_stands():
    task = resolve_task(str(DATA / "pope.yaml"))
    items = task.items()
    assert task.output_type == "pope" and task.needs_images and len(items) == 8
    assert items[0].query == "Is there a dog in the image? Answer the question using a single word or phrase."
    assert items[0].image == str((DATA / "images" / "COCO_val2014_000000000101.png").resolve())
    assert [item.gold for item in items] == [1, 1, 0, 1, 0, 0, 1, 0]
    assert items[0].choices == ["no", "yes"]


def _pope_run(monkeypatch, tmp_path):
    task = resolve_task(str(DATA / "pope.yaml"))
    answers = {}
    for item, before, after in zip(task.items(), POPE_BEFORE, POPE_AFTER, strict=True):
        answers[item.image, item.query] = (before, after)
    handle = SimpleNamespace(enabled=True)

    def canned(items, model, processor, max_new_tokens):
        assert max_new_tokens == 8
        return [answers[item.image, item.query][handle.enabled] for item in items]

    monkeypatch.setattr(scorers, "_generate", canned)
    results, _ = runner.evaluate(None, VISION_PROCESSOR, handle, [task], samples_dir=tmp_path, batch_size=3, seed=0)
    return results["pope-fixture"]


def test_pope_metrics_before_and_after_match_hand_counts(monkeypatch, tmp_path):
    metrics = _pope_run(monkeypatch, tmp_path)
    # before: TP 2, FN 2, FP 3, TN 1 -> acc 3/8, precision 2/5, recall 2/4, F1 2*.4*.5/.9 = 4/9, yes 5/8
    # after: all right -> 1, 1, 1, 1, yes 4/8
    expected = {
        "acc": (3 / 8, 1.0),
        "precision": (2 / 5, 1.0),
        "recall": (2 / 4, 1.0),
        "f1": (4 / 9, 1.0),
        "yes_ratio": (5 / 8, 4 / 8),
    }
    assert list(metrics) == list(expected)
    for name, (before, after) in expected.items():
        m = metrics[name]
        assert (m["baseline"], m["intervened"], m["n"]) == (pytest.approx(before), pytest.approx(after), 8)
        assert m["delta"] == pytest.approx(after - before)
        assert m["ci95"][0] - 1e-12 <= m["delta"] <= m["ci95"][1] + 1e-12
    # McNemar on accuracy only: 5 items gained, none lost -> two-sided 2 * (1/2)^5
    assert metrics["acc"]["p_value"] == pytest.approx(2 / 32)
    assert all(metrics[name]["p_value"] is None for name in ("precision", "recall", "f1", "yes_ratio"))


def test_pope_samples_keep_what_recomputes_the_metrics(monkeypatch, tmp_path):
    _pope_run(monkeypatch, tmp_path)
    samples = [json.loads(line) for line in (tmp_path / "samples_pope-fixture.jsonl").read_text().splitlines()]
    samples.sort(key=lambda s: s["index"])
    assert [s["baseline"]["output"] for s in samples] == POPE_BEFORE
    assert [s["baseline"]["answer"] for s in samples] == ["yes", "no", "yes", "no", "yes", "yes", "yes", "no"]
    assert [s["gold"] for s in samples] == [1, 1, 0, 1, 0, 0, 1, 0]
    assert samples[0]["image"].endswith("COCO_val2014_000000000101.png")
    tp = sum(s["baseline"]["answer"] == "yes" and s["gold"] == 1 for s in samples)
    said_yes = sum(s["baseline"]["answer"] == "yes" for s in samples)
    assert 2 * tp / (said_yes + 4) == pytest.approx(4 / 9)  # F1 from the log alone


def test_bootstrap_recomputes_a_corpus_metric_on_every_resample():
    """The CI of the F1 change equals a direct loop over the same resamples."""
    rng = np.random.default_rng(3)
    label = rng.random(60) < 0.5
    before, after = rng.random(60) < 0.6, np.where(rng.random(60) < 0.8, label, ~label)

    def counts(pred):  # the per-item POPE counts: correct, true positive, said yes, is yes
        return np.stack([pred == label, pred & label, pred, label], axis=1).astype(float)

    def f1(pred, truth):
        return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())

    statistic = lambda sums, n: scorers.corpus_metrics("pope", sums, n)["f1"]
    low, high = stats.paired_bootstrap_ci(counts(before), counts(after), statistic=statistic, seed=5, resamples=300)
    picks = np.random.default_rng(5).integers(0, 60, size=(300, 60))
    direct = [f1(after[pick], label[pick]) - f1(before[pick], label[pick]) for pick in picks]
    assert (low, high) == pytest.approx(tuple(np.percentile(direct, [2.5, 97.5])))


def test_a_ratio_with_nothing_to_divide_by_is_zero():
    # no "yes" said and none expected: precision, recall and F1 are 0, accuracy 1
    metrics = scorers.corpus_metrics("pope", np.array([3.0, 0.0, 0.0, 0.0]), 3)
    assert {k: float(v) for k, v in metrics.items()} == {
        "acc": 1.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
    }


# --------------------------------------------------------------------------------------------- CHAIR


@pytest.mark.parametrize(
    "word, singular",
    [
        ("dogs", "dog"), ("glasses", "glass"), ("buses", "bus"), ("bus", "bus"), ("horses", "horse"),
        ("women", "woman"), ("policemen", "policeman"), ("puppies", "puppy"), ("knives", "knife"), ("ties", "tie"),
        ("tennis", "tennis"), ("skis", "ski"), ("sandwiches", "sandwich"), ("toothbrushes", "toothbrush"),
        ("oranges", "orange"), ("sheep", "sheep"), ("has", "has"),
    ],
)  # fmt: skip
def test_plurals(word, singular):
    assert chair.singular(word) == singular


def test_caption_mentions_follow_the_chair_rules():
    vocab = chair.vocabulary()
    caption = "A man riding a motor bike past two hot dogs, a baby elephant and a toilet seat. Passenger trains!"
    assert vocab.mentions(caption) == [
        ("man", "person"),
        ("motor bike", "motorcycle"),  # a two-word synonym
        ("hot dog", "hot dog"),  # the longest match: not a dog
        ("elephant", "elephant"),  # "baby" before an animal is not a person
        ("toilet", "toilet"),  # "seat" is not a chair beside a toilet
        ("train", "train"),  # "passenger" before a vehicle is not a person
    ]
    assert len(vocab.phrases) > 200 and len(set(vocab.phrases.values())) == 80


def test_chair_ground_truth_joins_instances_and_reference_captions():
    task = resolve_task(str(DATA / "chair.yaml"))
    items = task.items()
    assert (
        task.output_type == "chair" and [item.query for item in items] == ["Please describe this image in detail."] * 3
    )
    # instances: 101 dog, person; 102 cat, dining table; 103 car. Captions add surfboard (101) and skis (103).
    assert [item.objects for item in items] == [
        ["dog", "person", "surfboard"],
        ["cat", "dining table"],
        ["car", "skis"],
    ]


CAPTIONS = [
    "A woman and her dogs play frisbee on the beach.",  # person, dog | frisbee hallucinated; 10 words
    "A cat sleeps on a wooden table.",  # cat, dining table; 7 words
    "Two cars and a bus with a baby dog in the street.",  # car | bus, dog hallucinated; 12 words
]


def test_chair_metrics_match_hand_counts(monkeypatch, tmp_path):
    task = resolve_task(str(DATA / "chair.yaml"))
    handle = SimpleNamespace(enabled=True)
    captions = {item.image: caption for item, caption in zip(task.items(), CAPTIONS, strict=True)}

    def canned(items, model, processor, max_new_tokens):
        assert max_new_tokens == 12
        return [captions[item.image] if handle.enabled else "A photo." for item in items]

    monkeypatch.setattr(scorers, "_generate", canned)
    results, _ = runner.evaluate(None, VISION_PROCESSOR, handle, [task], samples_dir=tmp_path, seed=0)
    metrics = results["chair-fixture"]
    # CHAIR_S: 2 of 3 captions hallucinate; CHAIR_I: (1 + 0 + 2) / (3 + 2 + 3) mentions;
    # recall: (2 + 2 + 1) / (3 + 2 + 2) objects; length (10 + 7 + 12) / 3. "A photo." mentions nothing, 2 words.
    expected = {"chair_s": 2 / 3, "chair_i": 3 / 8, "recall": 5 / 7, "length": 29 / 3}
    assert list(metrics) == list(expected)
    for name, value in expected.items():
        assert metrics[name]["intervened"] == pytest.approx(value)
    assert {name: m["baseline"] for name, m in metrics.items()} == {
        "chair_s": 0,
        "chair_i": 0,
        "recall": 0,
        "length": 2,
    }
    assert metrics["chair_s"]["p_value"] == pytest.approx(0.5)  # McNemar: 2 discordant, both one way: 2 * 1/4
    assert metrics["chair_i"]["p_value"] is None
    samples = [json.loads(line) for line in (tmp_path / "samples_chair-fixture.jsonl").read_text().splitlines()]
    by_index = {s["index"]: s for s in samples}
    assert by_index[2]["intervened"]["hallucinated_objects"] == ["bus", "dog"]
    assert by_index[2]["objects"] == ["car", "skis"]


def test_chair_needs_its_annotations_and_known_ids(tmp_path):
    with pytest.raises(TaskError, match=r"coco_instances: path/to/instances_val2014\.json"):
        Task(name="c", output_type="chair", data_files={"test": str(DATA / "chair.jsonl")})
    (tmp_path / "chair.jsonl").write_text('{"image_id": 101, "image": "a.png"}\n{"image_id": 999, "image": "a.png"}\n')
    shutil.copy(DATA / "images" / "COCO_val2014_000000000101.png", tmp_path / "a.png")
    task = Task(
        name="c", output_type="chair", data_files={"test": str(tmp_path / "chair.jsonl")},
        coco_instances=str(DATA / "instances_fixture.json"), coco_captions=str(DATA / "captions_fixture.json"),
    )  # fmt: skip
    with pytest.raises(TaskError, match=r"chair.jsonl:2: image_id 999 is in neither .*instances_fixture.json"):
        task.items()
    (tmp_path / "synonyms.txt").write_text("person, man\ndog\ncat\ncar\ndining table, table\n")
    other = Task(**{**task.__dict__, "coco_synonyms": str(tmp_path / "synonyms.txt")})
    with pytest.raises(TaskError, match="category 'skis' is not in the synonyms list"):
        other.items()


# ------------------------------------------------------------------------------------ loading errors


def test_a_missing_or_unreadable_image_names_the_record_and_the_path(tmp_path):
    shutil.copy(DATA / "images" / "COCO_val2014_000000000101.png", tmp_path / "ok.png")
    (tmp_path / "broken.png").write_text("not an image")
    record = {"question_id": 1, "text": "Is there a dog?", "label": "yes"}
    lines = [{**record, "image": "ok.png"}, {**record, "image": "gone.png"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    task = resolve_task(str(tmp_path / "q.jsonl"), output_type="pope")
    with pytest.raises(TaskError, match=rf"q.jsonl:2: image {tmp_path / 'gone.png'} does not exist"):
        task.items()
    lines[1]["image"] = "broken.png"
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(TaskError, match=r"q.jsonl:2: image .*broken.png cannot be read as an image"):
        task.items()
    lines[1] |= {"image": "ok.png", "label": "maybe"}
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(TaskError, match=r"q.jsonl:2: a POPE label is 'yes' or 'no', got 'maybe'"):
        task.items()


def test_image_root_and_doc_to_image_from_the_command_line_fields(tmp_path):
    (tmp_path / "pics").mkdir()
    shutil.copy(DATA / "images" / "COCO_val2014_000000000102.png", tmp_path / "pics" / "x.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"q": "What colour?", "a": "green", "pic": "x.png"}) + "\n")
    task = resolve_task(
        str(tmp_path / "q.jsonl"), output_type="generate_until", doc_to_text="q", doc_to_target="a",
        doc_to_image="pic", image_root=str(tmp_path / "pics"),
    )  # fmt: skip
    (item,) = task.items()
    assert item.image == str(tmp_path / "pics" / "x.png") and item.answers == ["green"]
    with pytest.raises(TaskError, match="images are scored by output_type pope, chair or generate_until"):
        resolve_task(str(tmp_path / "q.jsonl"), doc_to_image="pic")


def test_an_image_task_on_a_text_model_fails_before_loading_naming_task_model_and_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(intervene, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = invoke("eval", "--method", "act", "--tasks", "pope-photos", "--output-path", tmp_path)
    assert result.exit_code == 2
    assert "task 'pope-photos' needs images, but model 'smollm2-135m' is text-only" in result.output
    assert "--model tiny-llava" in result.output
    with pytest.raises(TaskError, match="needs images, but the model's"):
        scorers.score(builtin_tasks()["pope-photos"], [], None, SimpleNamespace())


def test_a_missing_image_fails_before_the_model_loads(tmp_path, monkeypatch, tiny_vlm_dir):
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"image": "gone.jpg", "text": "Is there a cat?", "label": "no"}) + "\n"
    )
    monkeypatch.setattr(intervene, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = invoke(
        "eval", "--method", "act", "--model", tiny_vlm_dir, "--tasks", tmp_path / "q.jsonl", "--output-type", "pope",
        "--output-path", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"q.jsonl:1: image {tmp_path / 'gone.jpg'} does not exist" in result.output


# ---------------------------------------------------------------------------------- built-in tasks


def test_builtin_image_tasks():
    tasks = builtin_tasks()
    easy, photos = tasks["easy-vqa"], tasks["pope-photos"]
    calib, test = easy.items("calib"), easy.items("test")
    assert (len(calib), len(test)) == (102, 248)
    for items in (calib, test):
        assert sum(item.gold for item in items) * 2 == len(items)  # balanced yes/no
    assert not {item.image for item in calib} & {item.image for item in test}  # split by image
    assert all(" not " not in item.query and Path(item.image).stat().st_size < 2000 for item in test)
    items = photos.items()
    assert len(items) == 56 and sum(item.gold for item in items) == 28 and len({item.image for item in items}) == 10
    assert items[0].query == "Is there a person in the image? Answer the question using a single word or phrase."
    assert sum(Path(image).stat().st_size for image in {item.image for item in items}) < 300_000
    listing = invoke("tasks").output
    assert any(line.split()[:2] == ["pope-photos", "pope"] for line in listing.splitlines())


# ----------------------------------------------------------------------------------- tiny-llava


def test_tiny_llava_is_a_llava_flagged_as_a_smoke_test(tiny_vlm, tiny_vlm_dir):
    model, processor = tiny_vlm
    assert type(model).__name__ == "LlavaForConditionalGeneration" and type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer.padding_side == "left"
    assert "not meaningful" in smoke_test_warning(model)
    assert is_vision_language("tiny-llava") and is_vision_language(str(tiny_vlm_dir))
    assert not is_vision_language("smollm2-135m")
    copy, _ = intervene.load_model(str(tiny_vlm_dir), device="cpu")
    assert smoke_test_warning(copy) == smoke_test_warning(model)  # the note travels with save_pretrained
    image = builtin_tasks()["pope-photos"].items()[0].image
    inputs = scorers._image_inputs([SimpleNamespace(image=image, query="Is there a cat?")], processor, model.dtype)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64  # 8x8 patches, CLS dropped


def test_generate_until_reads_images_too(tiny_vlm, tmp_path):
    shutil.copy(DATA / "images" / "COCO_val2014_000000000102.png", tmp_path / "x.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"q": "What colour is it?", "a": "green", "pic": "x.png"}) + "\n")
    task = resolve_task(str(tmp_path / "q.jsonl"), output_type="generate_until", doc_to_text="q", doc_to_target="a")
    task = Task(**{**task.__dict__, "doc_to_image": "pic", "generation_kwargs": {"max_new_tokens": 3}})
    model, processor = tiny_vlm
    (result,) = scorers.score(task, task.items(), model, processor)
    assert set(result) == {"output", "acc", "hallucination", "abstention"} and result["output"]


def test_batched_generation_with_left_padding_matches_one_at_a_time(tiny_vlm):
    model, processor = tiny_vlm
    items = builtin_tasks()["pope-photos"].items()[:3]
    items = [items[0], SimpleNamespace(image=items[1].image, query="Is there a dog?"), items[2]]  # unequal lengths
    batched = scorers._generate(items, model, processor, max_new_tokens=6)
    assert batched == [scorers._generate([item], model, processor, max_new_tokens=6)[0] for item in items]


# ---------------------------------------------------------------------------------- end to end


def eval_tiny_vlm(tmp_path, directory, method, tasks, params=()):
    result = invoke(
        "eval", "--method", method, *[arg for param in params for arg in ("--param", param)], "--model", directory,
        "--tasks", tasks, "--limit", 4, "--batch-size", 3, "--device", "cpu", "--output-path", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "SMOKE TEST: tiny-llava has random weights, so these numbers are not meaningful" in result.output
    (path,) = tmp_path.glob("*/results.json")
    document = json.loads(path.read_text())
    assert "not meaningful" in document["smoke_test"] and document["intervention"]["method"] == method
    return document, path.parent


def test_eval_end_to_end_on_a_saved_tiny_vlm(tmp_path, tiny_vlm_dir):
    tasks = f"pope-photos,{DATA / 'chair.yaml'},cldr_language"  # a text task runs on the VLM's tokenizer
    document, run_dir = eval_tiny_vlm(tmp_path, tiny_vlm_dir, "act", tasks)
    assert {task: list(m) for task, m in document["results"].items()} == {
        "pope-photos": ["acc", "precision", "recall", "f1", "yes_ratio"],
        "chair-fixture": ["chair_s", "chair_i", "recall", "length"],
        "cldr_language": ["acc", "acc_norm"],
    }
    assert (
        document["results"]["pope-photos"]["f1"]["n"] == 4 and document["results"]["chair-fixture"]["recall"]["n"] == 3
    )
    settings = document["config"]["task_settings"]["pope-photos"]
    assert settings["generation_kwargs"] == {"until": [], "max_gen_toks": 8, "do_sample": False}
    samples = (run_dir / "samples_pope-photos.jsonl").read_text().splitlines()
    assert len(samples) == 4 and json.loads(samples[0])["image"].endswith(".jpg")


@pytest.mark.parametrize(
    "method, params",
    [
        ("var", ()), ("pai", ()), ("pai", ("cfg_gamma=1.1",)), ("vcd", ()), ("vcd", ("alpha=0.5",)), ("causalmm", ()),
        ("causalmm", ("where=vision",)),
    ],
)  # fmt: skip
def test_vlm_methods_end_to_end_on_a_saved_tiny_vlm(tmp_path, tiny_vlm_dir, method, params):
    document, _ = eval_tiny_vlm(tmp_path, tiny_vlm_dir, method, "pope-photos", params)
    assert document["results"]["pope-photos"]["acc"]["n"] == 4
    for param in params:  # the contrast's settings are recorded with the method's
        name, value = param.split("=")
        recorded = document["intervention"]["params"][name]
        assert recorded == (value if isinstance(recorded, str) else float(value))
