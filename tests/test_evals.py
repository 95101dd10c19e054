"""Tasks from files, scorers against direct computations, paired statistics."""

import json

import numpy as np
import pytest
import torch

import intervene
from intervene.evals import runner, scorers, stats
from intervene.evals.tasks import Item, Task, TaskError, builtin_tasks, check_seeds, resolve_task

from conftest import build


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build("llama", vocab_size=len(tokenizer))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_builtin_tasks_have_calib_and_test_splits():
    tasks = {name: task for name, task in builtin_tasks().items() if not task.needs_images}  # images: test_evals_vlm
    assert set(tasks) == {"cldr_language", "cldr_currency", "mmlu_dev", "unanswerable_qa"}
    for task in tasks.values():
        calib, test = task.items("calib"), task.items("test")
        assert len(calib) > 50 and len(test) > 150
        assert not {i.query for i in calib} & {i.query for i in test}
    qa = tasks["unanswerable_qa"].items("test")
    assert any(i.answers == [] for i in qa) and any(i.answers for i in qa)


def test_a_query_choices_gold_jsonl_is_a_task_as_it_stands(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"query": "2+2=", "choices": ["3", "4"], "gold": 1}] * 3)
    task = resolve_task(str(path))
    assert task.name == "mine" and task.output_type == "multiple_choice"
    assert task.items() == [Item(query="2+2=", choices=["3", "4"], gold=1)] * 3
    assert len(task.items(limit=2)) == 2


def test_a_yaml_with_templates_reads_other_layouts(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "Capital of France?", "options": ["Rome", "Paris"], "answer": "Paris"}])
    (tmp_path / "qa.yaml").write_text(
        "task: capitals\n"
        "output_type: multiple_choice\n"
        "data_files: {test: qa.jsonl}\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\n'
        "doc_to_choice: options\n"
        "doc_to_target: answer\n"
    )
    task = resolve_task(str(tmp_path / "qa.yaml"))
    assert task.name == "capitals"
    assert task.items() == [Item(query="Question: Capital of France?\nAnswer:", choices=["Rome", "Paris"], gold=1)]


def test_csv_files_load_the_same_way_with_field_flags(tmp_path):
    (tmp_path / "t.csv").write_text('text,a,b,label\n"Is ice cold?",yes,no,0\n')
    fields = {"doc_to_text": "{{text}}", "doc_to_choice": "{{[a, b]}}", "doc_to_target": "label"}
    task = resolve_task(str(tmp_path / "t.csv"), **fields)
    assert task.items() == [Item(query="Is ice cold?", choices=["yes", "no"], gold=0)]


GOOD = '{"query": "a", "choices": ["x", "y"], "gold": 0}'


@pytest.mark.parametrize(
    "lines, message",
    [
        ([GOOD, '{"query": "b", "choices": ["x"'], r"bad\.jsonl:2: not valid JSON"),
        (['{"query": "a", "choices": ["x", "y"], "gold": 5}'], r"bad\.jsonl:1: gold must index one of the 2 choices"),
        ([GOOD, "", "[1, 2]"], r"bad\.jsonl:3: a record must be a JSON object"),
        (
            ['{"question": "a", "choices": ["x", "y"], "gold": 0}'],
            r"bad\.jsonl:1: doc_to_text: the record has no field 'query'",
        ),
        (['{"query": "a", "choices": "x", "gold": 0}'], r"bad\.jsonl:1: 'x' is neither a choice nor a Python literal"),
        ([], r"bad\.jsonl has no records"),
        # one float gold must not turn every gold into a float (as a column type would) and blame line 1
        ([GOOD] * 5 + ['{"query": "b", "choices": ["x", "y"], "gold": 1.5}'], r"bad\.jsonl:6: .* got 1\.5$"),
        ([GOOD, '{"query": "b", "choices": ["x", "y"], "gold": 1.0}'], r"bad\.jsonl:2: .* got 1\.0$"),
    ],
)
def test_malformed_task_files_name_the_file_line_and_problem(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(TaskError, match=message):
        resolve_task(str(path)).items()


def test_a_split_the_task_lacks_is_an_error_never_another_split(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"query": "2+2=", "choices": ["3", "4"], "gold": 1}])
    task = resolve_task(str(path))
    assert len(task.items("test")) == 1  # a plain file is the test split
    with pytest.raises(TaskError) as refused:
        task.items("calib")  # once read the test items in its place, and calibration then tuned on them
    message = str(refused.value)
    assert "task 'mine' has no 'calib' split, only test (mine.jsonl)" in message
    assert "data_files: {calib: my.calib.jsonl, test: my.test.jsonl}" in message and "--split" not in message
    (tmp_path / "dev.yaml").write_text("task: dev\ndata_files: {validation: mine.jsonl}\n")
    with pytest.raises(TaskError, match=r"no 'test' split, only validation \(mine\.jsonl\);.* --split validation$"):
        resolve_task(str(tmp_path / "dev.yaml")).items()


@pytest.mark.parametrize("name", ["mine/v2", "a\\b", ""])
def test_a_task_name_must_be_a_plain_name(tmp_path, name):
    write_jsonl(tmp_path / "mine.jsonl", [{"query": "2+2=", "choices": ["3", "4"], "gold": 1}])
    (tmp_path / "t.yaml").write_text(f"task: {json.dumps(name)}\ndata_files: {{test: mine.jsonl}}\n")
    with pytest.raises(TaskError, match=r"t\.yaml: task name .* is not a plain name.*without / or"):
        resolve_task(str(tmp_path / "t.yaml"))


def test_unknown_and_missing_tasks_are_refused(tmp_path):
    with pytest.raises(TaskError, match=r"unknown task 'cldr_lang'.*built-in tasks are cldr_currency, cldr_language"):
        resolve_task("cldr_lang")
    with pytest.raises(TaskError, match=r"task file .*nope\.jsonl does not exist"):
        resolve_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(TaskError, match="output_type 'regression' is not one of"):
        Task(name="t", output_type="regression")


def test_multiple_choice_log_likelihoods_match_a_direct_forward(tokenizer, tiny):
    task = Task(name="t")
    items = [Item("The capital of France is", ["Paris", "a big city"], 0), Item("One plus one is", ["two", "3"], 1)]
    results = scorers.score(task, items, tiny, tokenizer)
    for item, result in zip(items, results, strict=True):
        for choice, loglik in zip(item.choices, result["loglikelihoods"], strict=True):
            context = tokenizer(item.query).input_ids
            continuation = tokenizer(" " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = tiny(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
            expected = sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
            assert loglik == pytest.approx(expected, abs=1e-4)
        assert result["acc"] == float(np.argmax(result["loglikelihoods"]) == item.gold)
        # lm-eval's acc_norm: per character of the choice itself, the delimiter left out
        norm = [ll / len(c) for ll, c in zip(result["loglikelihoods"], item.choices, strict=True)]
        assert result["acc_norm"] == float(np.argmax(norm) == item.gold)


def test_classification_takes_the_argmax_over_label_tokens(tokenizer, tiny):
    task = Task(name="t", output_type="classification")
    items = [Item("Is the sky blue? Answer:", ["yes", "no"], 0), Item("Pick a letter:", list("ABCD"), 2)]
    results = scorers.score(task, items, tiny, tokenizer)
    for item, result in zip(items, results, strict=True):
        with torch.no_grad():
            last = tiny(torch.tensor([tokenizer(item.query).input_ids])).logits[0, -1].log_softmax(-1)
        labels = [tokenizer(" " + c, add_special_tokens=False).input_ids[-1] for c in item.choices]
        assert result["label_logprobs"] == pytest.approx(last[labels].tolist(), abs=1e-4)
        assert result["pred"] == int(last[labels].argmax())


@pytest.mark.parametrize(
    "generated, answers, expected",
    [  # (acc, hallucination, abstention)
        ("It is French.", ["French"], (1, 0, 0)),
        ("french\nQuestion: and German?", ["French"], (1, 0, 0)),  # cut at the delimiter, matched in any case
        ("German\nFrench", ["French"], (0, 1, 0)),  # what comes after the delimiter does not count
        ("I don't know.", ["French"], (0, 0, 1)),  # an abstention where an answer exists: wrong, not made up
        ("I don't know.", [], (1, 0, 1)),  # the question has no answer: abstaining is right
        ("Zubrowkan.", [], (0, 1, 0)),  # a confident answer to an unanswerable question: a hallucination
    ],
)
def test_generation_outcomes_follow_the_answers_and_abstentions(tokenizer, tiny, monkeypatch, generated, answers,
                                                                expected):  # fmt: skip
    task = Task(name="t", output_type="generate_until", generation_kwargs={"max_new_tokens": 4, "until": ["\n"]})
    monkeypatch.setattr(scorers, "_generate", lambda items, *args, **kwargs: [generated] * len(items))
    [result] = scorers.score(task, [Item("Official language of the country?", answers=answers)], tiny, tokenizer)
    assert (result["acc"], result["hallucination"], result["abstention"]) == expected
    assert result["output"] == generated.split("\n")[0]


def test_generation_is_the_greedy_continuation(tokenizer, tiny):
    task = Task(name="t", output_type="generate_until", generation_kwargs={"max_new_tokens": 4, "until": []})
    item = Item("Official language of France?", answers=["French"])
    [result] = scorers.score(task, [item], tiny, tokenizer)
    ids = torch.tensor([tokenizer(item.query).input_ids])
    with torch.no_grad():
        greedy = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert (
        result["output"]
        and result["output"] == tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True).strip()
    )


def test_a_sampling_task_samples_with_its_settings_and_pairs_the_two_passes(tokenizer, tiny, tmp_path):
    # Each batch is seeded from the run's seed, the same for both passes: a neutral intervention samples exactly
    # what the unwrapped model samples, another seed draws other text, and the same seed the same text again.
    sampled = {"do_sample": True, "temperature": 5.0, "top_k": 0, "max_new_tokens": 6, "until": []}
    records = [{"query": f"Language of country {n}?", "gold": "French"} for n in range(5)]
    data = write_jsonl(tmp_path / "t.jsonl", records)
    task = Task(name="t", output_type="generate_until", data_files={"test": str(data)}, generation_kwargs=sampled)
    calls, generate = [], tiny.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    tiny.generate = spy

    def outputs(seed: int, run: str) -> list[tuple[str, str]]:
        (tmp_path / run).mkdir()
        with intervene.apply(tiny, "zerotuning", gamma=1.0) as handle:
            runner.evaluate(tiny, tokenizer, handle, [task], samples_dir=tmp_path / run, batch_size=2, seed=seed)
        records = [json.loads(line) for line in (tmp_path / run / "samples_t.jsonl").read_text().splitlines()]
        return [(r["baseline"]["output"], r["intervened"]["output"]) for r in records]

    first = outputs(0, "first")
    assert calls[0]["do_sample"] is True and calls[0]["temperature"] == 5.0 and calls[0]["top_k"] == 0
    assert all(baseline == intervened for baseline, intervened in first)
    assert outputs(0, "again") == first
    assert outputs(1, "other") != first


def test_several_seeds_pool_the_runs_each_seed_alone_would_make(tokenizer, tiny, tmp_path):
    # A task that samples runs once per seed, each run what a run with that one seed makes (the same samples and
    # scores); the pooled scores are the mean of the runs' (accuracy: a mean of per-item outcomes), with a CI over
    # items, and no McNemar p (an item has several outcomes). A greedy task runs once.
    sampled = {"do_sample": True, "temperature": 5.0, "top_k": 0, "max_new_tokens": 4, "until": []}

    def tasks(records: list[dict]) -> tuple[Task, Task]:
        data = {"test": str(write_jsonl(tmp_path / "t.jsonl", records))}
        return (
            Task(name="t", output_type="generate_until", data_files=data, generation_kwargs=sampled),
            Task(name="g", output_type="generate_until", data_files=data, generation_kwargs={"max_new_tokens": 4}),
        )

    def run(folder: str, seed: int, seeds: int, chosen: tuple) -> dict:
        (tmp_path / folder).mkdir()
        with intervene.apply(tiny, "zerotuning", gamma=3.0) as handle:
            results, _ = runner.evaluate(
                tiny, tokenizer, handle, list(chosen), samples_dir=tmp_path / folder, batch_size=4, seed=seed,
                seeds=seeds,
            )  # fmt: skip
        return results

    # a random model answers nothing right: the answers are what seed 7's baseline says, so the scores vary by seed
    queries = [{"query": f"Language of country {n}?", "gold": "French"} for n in range(6)]
    run("probe", 7, 1, tasks(queries)[:1])
    logged = [json.loads(line) for line in (tmp_path / "probe" / "samples_t.jsonl").open()]
    said = {record["index"]: record["baseline"]["output"].split() for record in logged}
    task, greedy = tasks([{**q, "gold": (said[i] or ["French"])[0]} for i, q in enumerate(queries)])
    pooled = run("pooled", 7, 3, (task, greedy))
    alone = {seed: run(f"alone{seed}", seed, 1, (task,))["t"] for seed in (7, 8, 9)}
    for seed in (7, 8, 9):
        logged = (tmp_path / "pooled" / f"samples_t.seed{seed}.jsonl").read_text()
        assert logged == (tmp_path / f"alone{seed}" / "samples_t.jsonl").read_text()
    for name, metric in pooled["t"].items():
        for variant in ("baseline", "intervened"):
            each = [alone[seed][name][variant] for seed in (7, 8, 9)]
            assert [metric["seeds"][str(seed)][variant] for seed in (7, 8, 9)] == each
            assert metric[variant] == pytest.approx(np.mean(each), abs=1e-12)
        assert metric["p_value"] is None and metric["n"] == 6
        assert metric["ci95"][0] <= metric["delta"] <= metric["ci95"][1]
    assert len({tuple(alone[seed]["acc"][v] for v in ("baseline", "intervened")) for seed in alone}) > 1  # draws differ
    assert "seeds" not in pooled["g"]["acc"] and (tmp_path / "pooled" / "samples_g.jsonl").exists()
    assert not list((tmp_path / "pooled").glob("samples_g.seed*"))


def test_seeds_are_refused_where_no_task_samples():
    greedy = Task(name="g", output_type="generate_until")
    with pytest.raises(TaskError, match=r"--seeds 3 repeats the tasks that sample, and none of g samples"):
        check_seeds(3, [greedy])
    with pytest.raises(TaskError, match=r"--seeds 0: give how many seeds .* 1 or more"):
        check_seeds(0, [greedy])
    check_seeds(1, [greedy])


@pytest.mark.parametrize(
    "text, abstains",
    [("I don't know.", True), ("I don’t know", True), ("That country does not exist", True), ("French", False)],
)
def test_abstention_phrases(text, abstains):
    assert bool(scorers.ABSTAIN.search(text.lower().replace("’", "'"))) == abstains


def test_paired_bootstrap_and_mcnemar():
    rng = np.random.default_rng(0)
    baseline = rng.random(200) < 0.5
    intervened = baseline.copy()
    intervened[:30] = True
    low, high = stats.paired_bootstrap_ci(baseline, intervened, seed=1)
    delta = intervened.mean() - baseline.mean()
    assert low <= delta <= high and low > 0
    assert stats.paired_bootstrap_ci(baseline, intervened, seed=1) == (low, high)  # seeded
    assert stats.mcnemar_p([0] * 5, [1] * 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_p([1, 0, 1], [1, 0, 1]) == 1.0
    assert stats.mcnemar_p([1, 1, 0, 0], [0, 0, 1, 1]) == 1.0


def chair_plural(word: str) -> str:
    """English plural, written out independently of the CHAIR rules."""
    irregular = {"man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
                 "goose": "geese", "ox": "oxen", "knife": "knives", "calf": "calves", "policeman": "policemen",
                 "gentleman": "gentlemen"}  # fmt: skip
    uncountable = {"sheep", "cattle", "people", "children", "skis", "scissors", "luggage", "baggage", "broccoli"}
    if word in irregular or word in uncountable:
        return irregular.get(word, word)
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def test_chair_finds_the_plural_of_every_synonym():
    from intervene.evals import chair

    vocab = chair.vocabulary()
    synonyms = [name.strip() for line in chair.SYNONYMS.read_text().splitlines() for name in line.split(",")]
    missed = []
    for synonym in filter(None, synonyms):
        *head, last = synonym.split()
        (one,) = vocab.mentions(f"I saw a {synonym} there.")
        many = vocab.mentions(f"I saw two {' '.join([*head, chair_plural(last)])} there.")
        if [category for _, category in many] != [one[1]]:
            missed.append((synonym, many))
    assert not missed
    assert vocab.mentions("Two TVs, taxis, neckties and minibuses") == [
        ("tv", "tv"), ("taxi", "car"), ("necktie", "tie"), ("minibus", "bus"),
    ]  # fmt: skip
    # words that end like plurals but are not, or are plurals of no synonym, mention nothing
    assert (
        vocab.mentions("This is his tennis class: us, plus a cactus, an iris, an axis and the campus. It cares.") == []
    )


def test_add_bos_token_starts_every_prompt_and_no_continuation_with_it(tiny_checkpoint):
    import intervene
    from intervene.evals.model import starts_with_bos

    _, plain = intervene.load_model(str(tiny_checkpoint))
    model, tokenizer = intervene.load_model(str(tiny_checkpoint), add_bos_token=True)
    bos = tokenizer.bos_token_id
    assert not starts_with_bos(plain) and starts_with_bos(tokenizer)  # SmolLM2's tokenizer adds none by default
    query, choices = "The capital of France is", ["Paris", "Rome"]
    assert tokenizer(query).input_ids == [bos, *plain(query).input_ids]
    (result,) = scorers.score(Task(name="t"), [Item(query, choices, 0)], model, tokenizer)
    for choice, loglik in zip(choices, result["loglikelihoods"], strict=True):
        context = [bos, *plain(query).input_ids]
        continuation = plain(" " + choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
        assert loglik == pytest.approx(
            sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)), abs=1e-4
        )


def test_add_bos_token_on_a_tokenizer_without_one_is_refused(tiny_checkpoint, tmp_path):
    import shutil

    import intervene

    copy = shutil.copytree(tiny_checkpoint, tmp_path / "no-bos")
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**settings, "bos_token": None}))
    with pytest.raises(
        ValueError, match=r"add_bos_token: this model's tokenizer \(\w+\) has no BOS token; leave it off"
    ):
        intervene.load_model(str(copy), add_bos_token=True)
