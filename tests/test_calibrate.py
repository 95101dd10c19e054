"""Calibration: candidates, selection rules, the artifact's round trip, resuming, and never tuning on test."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import intervene
from intervene.cli import app
from intervene.evals import calibrate as engine
from intervene.evals.tasks import resolve_task
from intervene.interventions.act import ACT
from intervene.interventions.zerotuning import ZeroTuning

from conftest import build, left_padded, positions, prompt, tiny_lfm2


def profile(*deltas):
    return [{"label": f"c{i}", "heads": {i: [0]}, "delta": d} for i, d in enumerate(deltas)]


def test_candidates_at_each_granularity():
    assert engine.candidates("layer", [2, 3], 2) == [
        {"label": "layer 2", "heads": {2: [0, 1]}},
        {"label": "layer 3", "heads": {3: [0, 1]}},
    ]
    assert [c["heads"] for c in engine.candidates("head_index", [2, 3], 2)] == [{2: [0], 3: [0]}, {2: [1], 3: [1]}]
    assert len(engine.candidates("head", [2, 3], 4)) == 8
    with pytest.raises(ValueError, match="granularity 'neuron' is not one of layer, head_index, head"):
        engine.candidates("neuron", [2], 2)


@pytest.mark.parametrize(
    "rule, value, labels",
    [
        ("min_delta", 0.02, ["c3", "c1"]),
        ("min_delta", 0.0, ["c3", "c1", "c4"]),  # a delta of 0 (c2) never counts as help
        ("top_k", 2, ["c3", "c1"]),
        ("top_k", 10, ["c3", "c1", "c4"]),
        ("top_fraction", 0.4, ["c3", "c1"]),  # ceil(0.4 * 5) = 2
        ("top_fraction", 1.0, ["c3", "c1", "c4"]),
    ],
)
def test_selection_rules_keep_only_candidates_that_helped(rule, value, labels):
    chosen = engine.select(profile(-0.05, 0.03, 0.0, 0.08, 0.01), rule, value)
    assert [c["label"] for c in chosen] == labels
    assert engine.union(chosen) == {int(label[1]): [0] for label in sorted(labels)}


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="selection rule 'best' is not one of min_delta, top_k, top_fraction"):
        engine.select(profile(0.1), "best", 1)
    with pytest.raises(ValueError, match="objective 'median' is not one of mean, worst"):
        engine.select(profile(0.1), "top_k", 1, "median")


def task_profile(*changes):
    """Candidates with the per-task changes `changes[i]`, their mean and their worst, as `calibrate` records them."""
    return [
        {"label": f"c{i}", "heads": {i: [0]}, "deltas": d, "delta": sum(d.values()) / len(d), "worst": min(d.values())}
        for i, d in enumerate(changes)
    ]


@pytest.mark.parametrize(
    "rule, value, objective, labels",
    [
        ("top_k", 2, "mean", ["c0", "c2"]),  # the mean buys task a with task b
        ("no_regress", 0.02, "mean", ["c2", "c1"]),  # no task loses more than 0.02
        ("no_regress", 0.0, "mean", ["c1"]),
        ("min_delta", 0.0, "worst", ["c1"]),  # the smallest change must be a gain
        ("top_k", 3, "worst", ["c1"]),
    ],
)
def test_rules_that_respect_every_task(rule, value, objective, labels):
    changes = [{"a": 0.10, "b": -0.05}, {"a": 0.02, "b": 0.01}, {"a": 0.06, "b": -0.01}, {"a": -0.01, "b": -0.01}]
    chosen = engine.select(task_profile(*changes), rule, value, objective)
    assert [c["label"] for c in chosen] == labels


def test_no_regress_keeps_a_candidate_only_while_the_union_holds(tiny_checkpoint, small_task, tmp_path, monkeypatch):
    # Scores made up from the heads the candidate turns on: heads 0, 1 and 3 each help task a without hurting b, head 2
    # costs a 0.05; heads 0 and 1 together cost b 0.10. Kept best first: head 0, not head 1 (their union hurts b), head
    # 3 (the union of 0 and 3 keeps both tasks and gains). Every union tried is in the artifact, as are the changes.
    from intervene.hooks.dispatch import Dispatcher

    effects = {0: (0.10, 0.0), 1: (0.05, 0.0), 2: (-0.05, 0.20), 3: (0.01, 0.01)}

    def made_up(model, tokenizer, items, batch_size, seed=0):
        handles = Dispatcher.of(model).handles
        on = {h for hs in handles[0].config.heads.values() for h in hs} if handles else set()
        a = 0.5 + sum(effects[h][0] for h in on)
        b = 0.5 + sum(effects[h][1] for h in on) - (0.10 if {0, 1} <= on else 0.0)
        first, second = items
        return {first: a, second: b, "objective": (a + b) / 2}

    monkeypatch.setattr(engine, "score_tasks", made_up)
    model, tokenizer = intervene.load_model(str(tiny_checkpoint), device="cpu")
    artifact = engine.calibrate(
        model, tokenizer, "zerotuning", {"gamma": 4.0}, [small_task, replace(small_task, name="mini2")],
        granularity="head_index", rule="no_regress", value=0.02, output=tmp_path / "cal",
    )  # fmt: skip
    found = artifact["calibration"]
    assert found["selection"] == {"no_regress": 0.02} and found["objective"] == "mean"
    assert found["selected"] == ["head 0 of every layer", "head 3 of every layer"]
    assert {layer: heads for layer, heads in artifact["params"]["heads"].items()} == {
        layer: [0, 3] for layer in artifact["params"]["heads"]
    }
    assert [(u["union"], u["kept"]) for u in found["unions"]] == [
        ("head 0 of every layer", True),
        ("head 0 of every layer + head 1 of every layer", False),
        ("head 0 of every layer + head 3 of every layer", True),
    ]
    assert found["result_deltas"] == pytest.approx({"mini": 0.11, "mini2": 0.01})
    assert [c["deltas"] for c in found["profile"]][2] == pytest.approx({"mini": -0.05, "mini2": 0.20})


@pytest.fixture
def small_task(tmp_path):
    records = [
        {"query": f"Item {i}: the answer is", "choices": ["yes", "no", "maybe"], "gold": i % 3} for i in range(9)
    ]
    for split in ("calib", "test"):
        (tmp_path / f"mini.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "mini.yaml").write_text("task: mini\ndata_files: {calib: mini.calib.jsonl, test: mini.test.jsonl}\n")
    return resolve_task(str(tmp_path / "mini.yaml"))


def run_calibration(tiny_checkpoint, task, output, **kwargs):
    model, tokenizer = intervene.load_model(str(tiny_checkpoint), device="cpu")
    settings = {"granularity": "head_index", "rule": "top_k", "value": 2, "batch_size": 4, "output": output}
    return engine.calibrate(model, tokenizer, "zerotuning", {"gamma": 4.0}, [task], **{**settings, **kwargs})


def test_the_artifact_replays_exactly(tiny_checkpoint, small_task, tmp_path):
    artifact = run_calibration(tiny_checkpoint, small_task, tmp_path / "cal", gammas=[0.25, 4.0])
    found = artifact["calibration"]
    assert len(found["profile"]) == 4 and found["split"] == "calib"
    assert found["add_bos_token"] is False  # the tokenizer's choice, recorded (SmolLM2's adds no BOS)
    assert [g["gamma"] for g in found["gammas"]] == [0.25, 4.0]
    config = intervene.load_config(tmp_path / "cal" / "config.json")
    assert config.to_dict() == artifact["params"]
    model, _ = intervene.load_model(str(tiny_checkpoint), device="cpu")
    ids, mask = left_padded([prompt(7, 1), prompt(4, 2)])

    def run():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits

    with intervene.apply(model, config):
        replayed = run()
    with intervene.apply(model, "zerotuning", **artifact["params"]):
        direct = run()
    assert torch.equal(replayed, direct)


def test_an_interrupted_calibration_resumes_and_ends_the_same(tiny_checkpoint, small_task, tmp_path, monkeypatch):
    whole = run_calibration(tiny_checkpoint, small_task, tmp_path / "whole")
    calls = []
    real_scores = engine.score_tasks

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the baseline and one candidate finish, then Ctrl-C
            raise KeyboardInterrupt
        return real_scores(*args, **kwargs)

    monkeypatch.setattr(engine, "score_tasks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_calibration(tiny_checkpoint, small_task, tmp_path / "resumed")
    with open(tmp_path / "resumed" / "profile.jsonl", "a") as log:
        log.write('{"key": "head_index=1", "sco')  # and a kill while a line was written
    calls.clear()
    monkeypatch.setattr(engine, "score_tasks", lambda *a, **k: calls.append(1) or real_scores(*a, **k))
    resumed = run_calibration(tiny_checkpoint, small_task, tmp_path / "resumed")
    assert len(calls) == 3 + 1  # the three candidates left, then the selection: nothing is recomputed
    assert resumed == whole
    assert (tmp_path / "resumed" / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()
    with pytest.raises(ValueError, match="belongs to a calibration run with other settings"):
        run_calibration(tiny_checkpoint, small_task, tmp_path / "resumed", rule="min_delta", value=0.0)


def test_the_test_split_is_never_tuned_on(tiny_checkpoint, small_task, tmp_path):
    with pytest.raises(ValueError, match="calibrating on the test split"):
        run_calibration(tiny_checkpoint, small_task, tmp_path / "cal", split="test")
    result = CliRunner().invoke(
        app, ["calibrate", "--method", "act", "--split", "test", "--output-path", str(tmp_path)]
    )
    assert result.exit_code == 2 and "use --split calib" in result.output
    run_calibration(tiny_checkpoint, small_task, tmp_path / "cal")
    task_file = str(tmp_path / "mini.yaml")
    config = str(tmp_path / "cal" / "config.json")
    base = ["eval", "--model", str(tiny_checkpoint), "--config", config, "--tasks", task_file]
    refused = CliRunner().invoke(app, [*base, "--split", "calib", "--output-path", str(tmp_path / "e")])
    assert refused.exit_code == 2 and "was calibrated on the 'calib' split" in refused.output
    replayed = CliRunner().invoke(app, [*base, "--output-path", str(tmp_path / "e")])
    assert replayed.exit_code == 0, replayed.output


def test_a_task_without_a_calib_split_is_never_calibrated_on_its_test_items(tiny_checkpoint, small_task, tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"query": "Q", "choices": ["x", "y"], "gold": 0}) + "\n")
    result = CliRunner().invoke(
        app, ["calibrate", "--method", "act", "--model", str(tiny_checkpoint), "--tasks", str(plain),
              "--output-path", str(tmp_path / "cal")],
    )  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "task 'plain' has no 'calib' split, only test (plain.jsonl)" in result.output
    assert "give it a YAML with a file for each split, data_files: {calib:" in result.output
    assert not (tmp_path / "cal" / "config.json").exists()

    # a config whose calibration read the test file (as one-file tasks once did) is refused on that file
    run_calibration(tiny_checkpoint, small_task, tmp_path / "cal")
    config = json.loads((tmp_path / "cal" / "config.json").read_text())
    test_file = small_task.data_files["test"]
    config["calibration"]["tasks"]["mini"]["files"] = test_file
    (tmp_path / "leaky.json").write_text(json.dumps(config))
    result = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_checkpoint), "--config", str(tmp_path / "leaky.json"),
              "--tasks", str(tmp_path / "mini.yaml"), "--output-path", str(tmp_path / "e")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"was calibrated on {test_file}, which is the 'test' data of task 'mini'" in result.output


def test_a_calibration_that_selects_nothing_says_so(tiny_checkpoint, small_task, tmp_path):
    result = CliRunner().invoke(
        app, ["calibrate", "--method", "act", "--model", str(tiny_checkpoint), "--tasks", str(tmp_path / "mini.yaml"),
              "--select", "min_delta=2", "--limit", "4", "--output-path", str(tmp_path / "cal")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "selected 0 of" in result.output
    assert "warning: no candidate raised the objective, so this config edits no head and changes nothing" in (
        result.output
    )


PUBLISHED = Path(__file__).parent.parent / "configs" / "published"


def test_the_official_act_head_lists_import_and_apply_to_their_geometry():
    config = intervene.load_config(PUBLISHED / "llama-2-7b-chat" / "act-classification" / "config.json")
    assert config.saved_for["name_or_path"] == "meta-llama/Llama-2-7b-chat-hf"
    assert sum(map(len, config.heads.values())) == 184  # the official list: 184 of 928 candidate heads
    assert ACT.from_official([[1, 3], [], [0]], beta=0.3).heads == {2: [1, 3], 4: [0]}
    shaped = build("llama", num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=64)
    with intervene.apply(shaped, config) as handle:
        assert handle.config.layers[0] == 2 and len(handle.config.layers) == 28
        assert handle.config.heads[2] == (2, 8, 12, 13, 16, 17, 20, 25)
    with pytest.raises(ValueError, match=r"saved for meta-llama/Llama-2-7b-chat-hf \(32 layers x 32 heads\)"):
        intervene.apply(build("llama"), config)


def test_a_zerotuning_setting_imports_as_one_gamma_on_the_same_heads_of_each_layer():
    config = ZeroTuning.from_official((2.5, [0, 3], [1, 2]))
    assert config == ZeroTuning(gamma=2.5, heads={0: [1, 2], 3: [1, 2]})
    with intervene.apply(build("llama"), config) as handle:
        assert handle.active_layers == {0, 3}


def test_the_gamma_can_be_chosen_without_labels_by_entropy(tiny_checkpoint, small_task, tmp_path):
    artifact = run_calibration(
        tiny_checkpoint, small_task, tmp_path / "cal", rule="top_fraction", value=1.0, gammas=[0.25, 1.0, 4.0],
        gamma_by="entropy",
    )  # fmt: skip
    tried = artifact["calibration"]["gammas"]
    assert artifact["params"]["gamma"] == min(tried, key=lambda t: t["scores"]["entropy"])["gamma"]
    assert all(t["scores"]["entropy"] > 0 for t in tried)
    with pytest.raises(ValueError, match="gamma_by='loss' is not one of accuracy, entropy"):
        run_calibration(tiny_checkpoint, small_task, tmp_path / "other", gamma_by="loss")


def test_a_hybrid_is_calibrated_on_its_softmax_attention_layers_only(smollm2_tokenizer, small_task, tmp_path):
    model = tiny_lfm2(len(smollm2_tokenizer))
    artifact = engine.calibrate(model, smollm2_tokenizer, "zerotuning", {"gamma": 4.0}, [small_task],
                                granularity="layer", batch_size=4, output=tmp_path / "cal")  # fmt: skip
    assert [c["label"] for c in artifact["calibration"]["profile"]] == ["layer 1", "layer 3"]
    assert artifact["model"]["attention_layers"] == [1, 3]
    with intervene.apply(model, intervene.load_config(tmp_path / "cal" / "config.json")) as handle:
        assert set(handle.config.layers) <= {1, 3}


def test_calibrate_names_the_objectives_it_knows(tmp_path):
    args = ["calibrate", "--method", "act", "--objective", "median", "--output-path", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--objective mean, worst" in result.output
