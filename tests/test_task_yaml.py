"""lm-eval task YAMLs read by intervene's own reader: a corpus with one YAML per field, each honoured with
lm-eval's meaning (checked against lm-eval's own reading of the same YAML: every prompt, choice and gold) or
refused, naming the field and the fix; and the settings a task records are the ones its scorer used."""

import dataclasses
import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lm_eval.api.task import TaskConfig
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager

from intervene.evals import runner, scorers
from intervene.evals.tasks import DESCRIPTIVE, HONOURED, REFUSED, Task, TaskError, builtin_tasks, resolve_task

from conftest import build

CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Norway", "Oslo"), ("Japan", "Tokyo"),
    ("Peru", "Lima"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Iran", "Tehran"), ("Nepal", "Kathmandu"), ("Ghana", "Accra"), ("Laos", "Vientiane"),
]  # fmt: skip
SPLITS = {"train": slice(0, 6), "dev": slice(6, 10), "test": slice(10, 14)}


def record(i: int) -> dict:
    country, capital = CAPITALS[i]
    others = [CAPITALS[(i + k) % len(CAPITALS)][1] for k in (3, 7)]
    gold = i % 3
    options = [*others[:gold], capital, *others[gold:]]
    return {"q": f"What is the capital of {country}?", "opts": options, "a": gold, "letter": "ABC"[gold],
            "answer": capital, "subject": "geography"}  # fmt: skip


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """train, dev and test splits as JSONL, CSV and Parquet files; the working directory, from which lm-eval (and
    so intervene) reads the relative paths of `dataset_kwargs.data_files`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for split, rows in SPLITS.items():
        docs = [record(i) for i in range(len(CAPITALS))[rows]]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        flat = [{"q": d["q"], "o1": d["opts"][0], "o2": d["opts"][1], "o3": d["opts"][2], "a": d["a"]} for d in docs]
        (tmp_path / f"{split}.csv").write_text(
            "q,o1,o2,o3,a\n" + "".join(f'"{d["q"]}",{d["o1"]},{d["o2"]},{d["o3"]},{d["a"]}\n' for d in flat)
        )
        pq.write_table(pa.Table.from_pylist(docs), tmp_path / f"{split}.parquet")
    return tmp_path


DATA = "dataset_path: json\ndataset_kwargs:\n  data_files: {train: train.jsonl, dev: dev.jsonl, test: test.jsonl}\n"
MC = DATA + 'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "Q: {{q}}\\nA:"\ndoc_to_choice: opts\n'
MC += "doc_to_target: a\n"
GEN = DATA + 'test_split: test\noutput_type: generate_until\ndoc_to_text: "Q: {{q}}\\nA:"\ndoc_to_target: answer\n'

HONOURED_MC = {
    "plain": MC,
    "description": MC + 'description: "Answer about {{subject}}.\\n\\n"\n',
    "description_block_keeps_its_newline": MC + "description: |\n  Capitals of the world.\n",
    "description_a_field": MC + "description: subject\n",
    "num_fewshot_fewshot_split": MC + "num_fewshot: 3\nfewshot_split: train\n",
    "fewshot_split_is_test_split": MC + "num_fewshot: 2\nfewshot_split: test\n",  # the question is left out
    "fewshot_from_training_split": MC + "num_fewshot: 2\ntraining_split: train\n",
    "fewshot_from_validation_split": MC + "num_fewshot: 2\nvalidation_split: dev\n",
    "fewshot_delimiter": MC + 'num_fewshot: 2\nfewshot_split: train\nfewshot_delimiter: "\\n###\\n"\n',
    "target_delimiter": MC + 'num_fewshot: 1\nfewshot_split: train\ntarget_delimiter: ": "\n',
    "test_split": MC.replace("test_split: test", "test_split: dev"),
    "validation_split": MC.replace("test_split: test", "validation_split: dev"),
    "data_files_one_file": MC.replace("{train: train.jsonl, dev: dev.jsonl, test: test.jsonl}", "test.jsonl").replace(
        "test_split: test", "test_split: train"
    ),  # one file is `datasets`' split "train"
    "doc_to_choice_literal_list": MC.replace("doc_to_choice: opts", 'doc_to_choice: ["A", "B", "C"]'),
    "doc_to_choice_literal_list_letter_target": MC.replace("doc_to_choice: opts", "doc_to_choice: [A, B, C]").replace(
        "doc_to_target: a", "doc_to_target: letter"
    ),
    "doc_to_choice_dict": MC.replace("doc_to_choice: opts", "doc_to_choice: {x: A, y: B, z: C}"),
    "doc_to_choice_template": MC.replace("doc_to_choice: opts", 'doc_to_choice: "{{opts}}"'),
    "doc_to_target_choice_text": MC.replace("doc_to_target: a", "doc_to_target: answer"),
    "doc_to_target_template_digit": MC.replace("doc_to_target: a", 'doc_to_target: "{{a}}"'),
    "doc_to_text_block": MC.replace('doc_to_text: "Q: {{q}}\\nA:"', "doc_to_text: |\n  {{q}}\n  Answer:"),
    "metric_list": MC + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
    "tag_and_metadata": MC + "tag: geography\nmetadata:\n  version: 1.0\n",
    "csv": MC.replace(".jsonl", ".csv").replace("json", "csv").replace("opts", "'{{[o1, o2, o3]}}'"),
    "parquet": MC.replace(".jsonl", ".parquet").replace("json", "parquet") + "num_fewshot: 1\nfewshot_split: dev\n",
}

HONOURED_GENERATION = {
    "generate_until": GEN + "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 3\n",
    "defaults": GEN,  # lm-eval: until the few-shot delimiter, 256 new tokens, greedy
    "until_is_the_fewshot_delimiter": GEN + 'fewshot_delimiter: "\\n\\n\\n"\ngeneration_kwargs: {max_gen_toks: 5}\n',
    "max_new_tokens": GEN + "generation_kwargs: {until: [Q], max_new_tokens: 7}\n",  # lm-eval's other name
    # greedy: lm-eval sets the temperature to 0 where do_sample is false
    "greedy_with_a_temperature": GEN + "generation_kwargs: {do_sample: false, temperature: 0.7}\n",
    "temperature_zero": GEN + "generation_kwargs: {temperature: 0}\n",
    "until_a_string": GEN + "generation_kwargs: {until: 'Q:'}\n",
    "description_and_fewshot": GEN + 'description: "Capitals.\\n"\nnum_fewshot: 2\nfewshot_split: train\n',
    "no_output_type": GEN.replace("output_type: generate_until\n", ""),  # lm-eval's default output type
    "doc_to_choice": GEN.replace("doc_to_target: answer", "doc_to_target: a\ndoc_to_choice: opts"),
}


def write(folder, body: str, name: str = "t"):
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\n{body}")
    return path


def lm_eval_task(folder, name: str = "t", limit: int | None = None):
    """lm-eval's own reading of the YAML: the task, and each document's requests in order."""
    task = TaskManager(include_path=str(folder), include_defaults=False).load([name])["tasks"][name]
    task.set_fewshot_seed(1234)  # as simple_evaluate does, with its default fewshot_random_seed
    task.build_all_requests(limit=limit)
    requests = {}
    for instance in task.instances:
        requests.setdefault(instance.doc_id, []).append(instance)
    return task, [sorted(group, key=lambda instance: instance.idx) for _, group in sorted(requests.items())]


@pytest.mark.parametrize("body", HONOURED_MC.values(), ids=HONOURED_MC.keys())
def test_multiple_choice_fields_read_as_lm_eval_reads_them(folder, body):
    write(folder, body)
    assert_read_as_lm_eval_reads_it(folder)


def test_a_limit_draws_the_few_shot_examples_that_lm_eval_draws(folder):
    for split in ("train", "test"):  # drawn n at a time; n + 1, less the question, from the scored split
        write(folder, MC + f"num_fewshot: 2\nfewshot_split: {split}\n")
        assert_read_as_lm_eval_reads_it(folder, limit=3)


def assert_read_as_lm_eval_reads_it(folder, limit: int | None = None):
    """Our items are lm-eval's requests: the context, each continuation, and the gold of every document."""
    items = resolve_task(str(folder / "t.yaml")).items(limit=limit)
    task, requests = lm_eval_task(folder, limit=limit)
    assert len(items) == len(requests) == (limit or 4)
    for item, instances in zip(items, requests, strict=True):
        assert [instance.arguments[0] for instance in instances] == [item.query] * len(item.choices)
        assert [instance.arguments[1] for instance in instances] == [
            task.config.target_delimiter + c for c in item.choices
        ]
        doc = instances[0].doc
        gold, choices = task.doc_to_target(doc), task.doc_to_choice(doc)
        assert item.gold == (choices.index(gold) if isinstance(gold, str) else gold)  # as lm-eval's process_results


@pytest.mark.parametrize("body", HONOURED_GENERATION.values(), ids=HONOURED_GENERATION.keys())
def test_generation_fields_read_as_lm_eval_reads_them(folder, body):
    write(folder, body)
    ours = resolve_task(str(folder / "t.yaml"))
    task, requests = lm_eval_task(folder)
    for item, (instance,) in zip(ours.items(), requests, strict=True):
        context, kwargs = instance.arguments
        assert item.query == context
        gold = task.doc_to_target(instance.doc)
        if task.config.doc_to_choice is not None:
            gold = task.doc_to_choice(instance.doc)[gold]
        assert item.answers == [gold]
    used = normalize_gen_kwargs(kwargs, 256)  # what lm-eval's hf model generates with (256: its max_gen_toks)
    assert used["do_sample"] is False and used.get("temperature", 0.0) == 0.0  # greedy in lm-eval too
    recorded = ours.settings()["generation_kwargs"]
    assert recorded == {"until": used["until"], "max_gen_toks": used["max_gen_toks"], "do_sample": False}


SAMPLED_GENERATION = {
    "do_sample": GEN + "generation_kwargs: {do_sample: true, temperature: 0.7, top_p: 0.9, top_k: 5}\n",
    "temperature_alone": GEN + "generation_kwargs: {temperature: 0.8}\n",  # lm-eval samples above 0
    "model_defaults_for_the_rest": GEN + "generation_kwargs: {do_sample: true, temperature: 1.0}\n",
}


@pytest.mark.parametrize("body", SAMPLED_GENERATION.values(), ids=SAMPLED_GENERATION.keys())
def test_sampling_fields_read_as_lm_eval_reads_them(folder, body):
    write(folder, body)
    recorded = resolve_task(str(folder / "t.yaml")).settings()["generation_kwargs"]
    _, [(instance, *_), *_] = lm_eval_task(folder)
    used = normalize_gen_kwargs(instance.arguments[1], 256)
    assert used["do_sample"] is True
    sampling = {name: used[name] for name in ("temperature", "top_p", "top_k") if name in used}
    assert recorded == {"until": used["until"], "max_gen_toks": used["max_gen_toks"], "do_sample": True, **sampling}


def test_settings_record_what_decides_the_numbers_and_nothing_else(folder):
    write(folder, MC + 'description: "Capitals.\\n"\nnum_fewshot: 2\nfewshot_split: train\ntag: geo\n')
    assert resolve_task(str(folder / "t.yaml")).settings() == {
        "output_type": "multiple_choice", "doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": "opts", "doc_to_target": "a",
        "description": "Capitals.\n", "target_delimiter": " ", "num_fewshot": 2, "fewshot_split": "train",
        "fewshot_delimiter": "\n\n", "fewshot_seed": 1234, "metrics": ["acc", "acc_norm"],
    }  # fmt: skip
    write(folder, GEN + "generation_kwargs: {do_sample: false, temperature: 0.9, max_new_tokens: 4}\n")
    assert resolve_task(str(folder / "t.yaml")).settings() == {
        "output_type": "generate_until", "doc_to_text": "Q: {{q}}\nA:", "doc_to_target": "answer",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False},  # no temperature: unused
        "metrics": ["acc", "hallucination", "abstention"],
    }  # fmt: skip


def test_a_generation_task_generates_with_the_settings_it_records(folder, smollm2_tokenizer):
    write(folder, GEN + "generation_kwargs: {until: ['.', ' the'], max_gen_toks: 3}\n")
    task = resolve_task(str(folder / "t.yaml"))
    model = build("llama", vocab_size=len(smollm2_tokenizer))
    calls, generate = [], model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs, out.shape[1] - kwargs["input_ids"].shape[1]))
        return out

    model.generate = spy
    results = scorers.score(task, task.items(), model, smollm2_tokenizer)
    assert task.settings()["generation_kwargs"] == {"until": [".", " the"], "max_gen_toks": 3, "do_sample": False}
    assert calls and all(kwargs["max_new_tokens"] == 3 and kwargs["do_sample"] is False for kwargs, _ in calls)
    assert all(new <= 3 for _, new in calls)
    assert not any("." in result["output"] or " the" in result["output"] for result in results)
    _, [(instance, *_), *_] = lm_eval_task(folder)
    assert normalize_gen_kwargs(instance.arguments[1], 256)["max_gen_toks"] == 3  # lm-eval's reading: 3 too


@pytest.mark.parametrize(
    "text, stops", [("Paris.\nRome", ["\n", "."]), ("\n\nParis", ["\n\n"]), ("Paris", [""]), ("a Q: b", ["Q:"])]
)
def test_generations_are_cut_at_the_stop_strings_as_lm_eval_cuts_them(text, stops):
    assert scorers.cut(text, stops) == postprocess_generated_text(text, stops, None)


def test_metric_list_reports_only_the_metrics_it_lists(folder, smollm2_tokenizer, tmp_path):
    write(folder, MC + "metric_list:\n  - metric: acc_norm\n")
    task = resolve_task(str(folder / "t.yaml"))
    model = build("llama", vocab_size=len(smollm2_tokenizer))
    handle = SimpleNamespace(enabled=True)
    results, _ = runner.evaluate(model, smollm2_tokenizer, handle, [task], samples_dir=tmp_path, batch_size=2)
    assert list(results["t"]) == ["acc_norm"] and task.settings()["metrics"] == ["acc_norm"]


ROUTE = "run it as an lm-eval task: intervene eval --tasks t --include-path "
REFUSED_YAML = {
    "filter_list": (MC + "filter_list:\n  - name: x\n    filter: [{function: take_first}]\n", "filter_list (post-"),
    "process_docs": (MC + "process_docs: !function utils.process\n", "process_docs (Python that rewrites"),
    "process_results": (MC + "process_results: !function utils.score\n", "process_results (Python scoring)"),
    "function_doc_to_text": (
        MC.replace('"Q: {{q}}\\nA:"', "!function utils.text"),
        "doc_to_text (!function utils.text",
    ),
    "function_metric": (MC + "metric_list:\n  - metric: !function utils.m\n", "metric_list (!function utils.m"),
    "repeats": (MC + "repeats: 3\n", "repeats (repeated generations)"),
    "fewshot_config": (MC + "fewshot_config: {sampler: first_n}\n", "fewshot_config (few-shot options"),
    "dataset_name": (MC + "dataset_name: main\n", "dataset_name (a configuration of a hub dataset)"),
    "task_alias": (MC + "task_alias: Capitals\n", "task_alias (a display name"),
    "gen_prefix": (GEN + "gen_prefix: 'The capital is'\n", "gen_prefix (a prefix of the answer)"),
    "use_prompt": (MC + "use_prompt: promptsource:x\n", "use_prompt (a promptsource prompt)"),
    "include": (MC + "include: base.yaml\n", "include (fields from another YAML)"),
    "loglikelihood": (MC.replace("multiple_choice", "loglikelihood"), "output_type loglikelihood (lm-eval's"),
    "loglikelihood_rolling": (
        MC.replace("multiple_choice", "loglikelihood_rolling"),
        "output_type loglikelihood_rolling",
    ),
    "metric_exact_match": (
        GEN + "metric_list:\n  - metric: exact_match\n",
        "metric_list exact_match (intervene's generate_until scorer computes acc, hallucination, abstention)",
    ),
    "metric_acc_bytes": (
        MC + "metric_list:\n  - metric: acc_bytes\n",
        "metric_list acc_bytes (intervene's multiple_choice scorer computes acc, acc_norm)",
    ),
    "metric_ignore_case": (
        GEN + "metric_list:\n  - metric: acc\n    ignore_case: true\n",
        "metric_list acc option ignore_case",
    ),
    "metric_regexes_to_ignore": (
        GEN + "metric_list:\n  - metric: acc\n    regexes_to_ignore: [',']\n",
        "metric_list acc option regexes_to_ignore",
    ),
    "metric_aggregation": (
        MC + "metric_list:\n  - metric: acc\n    aggregation: median\n",
        "metric_list acc aggregation median",
    ),
    "do_sample": (GEN + "generation_kwargs: {do_sample: 'yes'}\n", "do_sample 'yes' (true or false)"),
    "sampling_at_temperature_zero": (
        GEN + "generation_kwargs: {do_sample: true, temperature: 0}\n",
        "do_sample true with temperature 0 (give a temperature above 0)",
    ),
    "temperature": (GEN + "generation_kwargs: {temperature: -1}\n", "temperature -1 (a number, 0 or more)"),
    "top_p": (
        GEN + "generation_kwargs: {do_sample: true, temperature: 1, top_p: 1.5}\n",
        "top_p 1.5 (a number in (0, 1])",
    ),
    "num_beams": (
        GEN + "generation_kwargs: {num_beams: 4}\n",
        "generation_kwargs num_beams (the scorers read until, max_gen_toks, do_sample, temperature, top_p, top_k)",
    ),
    "two_max_tokens": (
        GEN + "generation_kwargs: {max_gen_toks: 4, max_new_tokens: 8}\n",
        "max_gen_toks and max_new_tokens (one setting",
    ),
    "generation_kwargs_on_multiple_choice": (
        MC + "generation_kwargs: {until: [x]}\n",
        "generation_kwargs (a multiple_choice task generates nothing",
    ),
    "hub_dataset": (
        MC.replace("dataset_path: json", "dataset_path: cais/mmlu"),
        "dataset_path cais/mmlu (a hub dataset",
    ),
    "dataset_kwargs_option": (
        MC.replace("  data_files:", "  field: data\n  data_files:"),
        "dataset_kwargs field (an option of `datasets`)",
    ),
}


@pytest.mark.parametrize("body, message", REFUSED_YAML.values(), ids=REFUSED_YAML.keys())
def test_fields_the_reader_does_not_honour_are_refused_by_name(folder, body, message):
    write(folder, body)
    with pytest.raises(TaskError) as refused:
        resolve_task(str(folder / "t.yaml"))
    assert message in str(refused.value)
    assert f"{ROUTE}{folder}" in str(refused.value)


def test_every_refused_and_unknown_field_is_named_in_one_error(folder):
    body = MC + "filter_list: []\nprocess_docs: !function utils.p\nrepeats: 2\nfoo: 1\nbar: 2\n"
    write(folder, body + "metric_list:\n  - metric: exact_match\n")
    with pytest.raises(TaskError) as refused:
        resolve_task(str(folder / "t.yaml"))
    message = str(refused.value)
    for part in ("filter_list (", "process_docs (", "repeats (", "metric_list exact_match (", ROUTE):
        assert part in message
    assert "unknown task fields 'bar', 'foo'; known fields: " in message


def test_unknown_fields_alone_are_named_with_the_known_ones(folder):
    write(folder, MC + "doc_to_txt: q\n")
    with pytest.raises(TaskError, match=r"unknown task field 'doc_to_txt'; known fields: .*doc_to_text") as refused:
        resolve_task(str(folder / "t.yaml"))
    assert "lm-eval task" not in str(refused.value)  # a typo, not a field of lm-eval's


def test_our_own_data_files_yaml_is_pointed_at_lm_evals_data_fields(folder):
    write(folder, "data_files: {test: test.jsonl}\ndoc_to_text: q\ndoc_to_choice: opts\ndoc_to_target: a\nrepeats: 2\n")
    with pytest.raises(TaskError, match=r"repeats .*--include-path .* \(with its data as dataset_path: json and"):
        resolve_task(str(folder / "t.yaml"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"generation_kwargs": {"do_sample": "yes"}}, "do_sample 'yes'"),
        ({"generation_kwargs": {"top_k": -1}}, "top_k -1"),
        ({"generation_kwargs": {"num_beams": 4}}, "generation_kwargs num_beams"),
        ({"metrics": ("exact_match",)}, "metric 'exact_match'"),
        ({"num_fewshot": 2, "fewshot_split": "train"}, "num_fewshot 2 draws examples from split 'train'"),
    ],
)
def test_tasks_built_in_python_are_held_to_the_same_rules(kwargs, message):
    with pytest.raises(TaskError, match=message):
        Task(name="t", output_type="generate_until", data_files={"test": "t.jsonl"}, **kwargs)


def test_the_scored_and_few_shot_splits_are_checked_by_name(folder):
    write(folder, MC + "num_fewshot: 2\nfewshot_split: training\n")
    with pytest.raises(TaskError, match=r"draws examples from split 'training' .* none of its splits train, dev, test"):
        resolve_task(str(folder / "t.yaml"))
    write(folder, MC.replace("test_split: test", "test_split: eval"))
    with pytest.raises(TaskError, match=r"has no 'eval' \(the split its YAML scores\) split, only train \(train"):
        resolve_task(str(folder / "t.yaml")).items()
    write(folder, MC + "num_fewshot: 4\nfewshot_split: test\n")
    with pytest.raises(TaskError, match=r"num_fewshot 4 needs 5 records in split 'test' \(lm-eval draws one more"):
        resolve_task(str(folder / "t.yaml")).items()


def test_a_bare_word_that_is_no_field_is_refused_as_a_typo(folder):
    write(folder, MC.replace("doc_to_target: a", "doc_to_target: answr"))
    with pytest.raises(TaskError, match=r"no field 'answr'; its fields are: q, opts, .* write it as a template"):
        resolve_task(str(folder / "t.yaml")).items()


def test_every_field_of_lm_evals_task_config_is_honoured_or_refused():
    fields = {field.name for field in dataclasses.fields(TaskConfig)}
    assert fields <= HONOURED | DESCRIPTIVE | REFUSED.keys(), fields - (HONOURED | DESCRIPTIVE | REFUSED.keys())


def test_templates_render_in_a_sandbox(folder):
    write(folder, MC.replace('"Q: {{q}}\\nA:"', '"{{ q.__class__.__mro__[1].__subclasses__() }}"'))
    with pytest.raises(TaskError, match=r"template .* is refused by the sandbox a task.s templates run in: .*unsafe"):
        resolve_task(str(folder / "t.yaml")).items()


def test_builtin_tasks_have_no_description_before_their_prompts():
    for task in builtin_tasks().values():
        assert task.description == "" and task.summary  # their one-line summaries are metadata
