"""Calibration: candidates, selection rules, the artifact's round trip, resuming, and never tuning on test."""

import json
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
    real_objective = engine.objective

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the baseline and one candidate finish, then Ctrl-C
            raise KeyboardInterrupt
        return real_objective(*args, **kwargs)

    monkeypatch.setattr(engine, "objective", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_calibration(tiny_checkpoint, small_task, tmp_path / "resumed")
    with open(tmp_path / "resumed" / "profile.jsonl", "a") as log:
        log.write('{"key": "head_index=1", "sco')  # and a kill while a line was written
    calls.clear()
    monkeypatch.setattr(engine, "objective", lambda *a, **k: calls.append(1) or real_objective(*a, **k))
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
