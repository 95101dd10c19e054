"""`intervene.record_attention` and `intervene inspect`: the recorded maps are the probabilities the model
used (eager attention's weights without an edit, the edited layer's own output with one), the sinks found
are ACT's, and the command writes its pictures and table on the real default model."""

import json
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import intervene
from intervene.cli import app
from intervene.evals.inspect import inspect
from intervene.hooks.compat import implementation

from conftest import build, left_padded, prompt, tiny_lfm2

PICTURE = "evals/data/pope-photos/astronaut.jpg"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_recorded_maps_are_the_eager_attention_weights_and_change_nothing():
    model, eager = build("llama"), build("llama", attn_implementation="eager")  # same seed: same weights
    ids, mask = left_padded([prompt(9, 1), prompt(6, 2)])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        weights = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with intervene.record_attention(model) as recorded:
            logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits, plain)  # recording only reads
    assert implementation(model.config) == "sdpa"  # attached to record, detached after
    valid = mask.bool()[:, None, :, None]  # padded query rows see nothing; compare real rows
    for layer, expected in enumerate(weights):
        assert recorded[layer].shape == expected.shape == (2, 4, 9, 9)
        torch.testing.assert_close(recorded[layer] * valid, expected * valid, atol=1e-6, rtol=0)


def test_recorded_maps_are_what_an_edited_layer_computed():
    model = build("llama")
    ids, mask = left_padded([prompt(12, 3), prompt(8, 4)])
    layer = model.model.layers[2].self_attn
    seen = {}
    layer.v_proj.register_forward_hook(lambda m, args, out: seen.update(v=out))
    layer.o_proj.register_forward_pre_hook(lambda m, args: seen.update(heads=args[0]))
    handle = intervene.apply(model, "act", beta=0.2, threshold=0.05, layers=[2])
    with handle, intervene.record_attention(model) as recorded, torch.no_grad():
        handle.enabled = False
        model(input_ids=ids, attention_mask=mask)
        before = dict(recorded)
        handle.enabled = True
        model(input_ids=ids, attention_mask=mask)
    B, N = ids.shape
    v = seen["v"].view(B, N, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)  # [B, Hq, N, D]: GQA 4/2
    heads = seen["heads"].view(B, N, 4, 16).transpose(1, 2)  # [B, Hq, N, D] going into o_proj
    real = mask.bool()[:, None, :, None]
    torch.testing.assert_close((recorded[2] @ v) * real, heads * real, atol=1e-5, rtol=0)
    assert (recorded[2] - before[2]).abs().max() > 0.05  # the edit moved mass
    assert torch.equal(recorded[1], before[1])  # layers before the edited one are untouched
    sums = recorded[2].sum(dim=-1)[mask.bool()[:, None, :].expand(-1, 4, -1)]  # each real row's total
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def test_inspect_reports_the_sinks_act_detects(tmp_path, tiny_checkpoint):
    model, tokenizer = intervene.load_model(str(tiny_checkpoint), device="cpu")
    with intervene.apply(model, "act", threshold=0.05, layers=[0]) as handle:
        text, _ = inspect(model, tokenizer, "The cat sat on the mat and looked at the door.", handle=handle,
                       threshold=0.05, output=tmp_path)  # fmt: skip
        detected = handle.state.sinks[0].mask[0]  # [Hq, N]: what ACT found in layer 0 (before any edit)
    document = json.loads((tmp_path / "sinks.json").read_text())
    found = document["before"]["hidden_sinks"][0]
    assert found == {str(i): int(n) for i, n in enumerate(detected.sum(dim=0).tolist()) if n} and found
    assert document["after"]["hidden_sink_attention"][0] < document["before"]["hidden_sink_attention"][0]
    assert document["after"]["hidden_sink_attention"][1:] != document["before"]["hidden_sink_attention"][1:]
    layers = model.config.num_hidden_layers
    assert len(document["before"]["first_token_attention"]) == layers
    assert text.count("\n| ") == layers + 1 and "sink rate" in text
    for name in ("attention.png", "sinks.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.width > 400 and picture.height > 300


def test_inspect_shows_a_learned_sink_apart_from_the_tokens(tmp_path, smollm2_tokenizer):
    """A tiny random gpt-oss: each row's mass on its head's learned sink (s_aux) is a column of its own in the
    table, in sinks.json and in the maps; raising the sinks with ZeroTuning's target="learned_sink" raises it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt_oss", vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, sliding_window=6,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    prompt = "The cat sat on the mat."
    inputs = smollm2_tokenizer(prompt, return_tensors="pt")
    with intervene.record_attention(model) as recorded, torch.no_grad():
        model(**inputs)
    with intervene.apply(model, "zerotuning", gamma=4.0, target="learned_sink") as handle:
        text, _ = inspect(model, smollm2_tokenizer, prompt, handle=handle, output=tmp_path)
    document = json.loads((tmp_path / "sinks.json").read_text())
    learned = torch.tensor(document["before"]["learned_sink_attention"])  # [L, Hq]
    expected = torch.stack([(1 - recorded[layer][0].sum(dim=-1)).mean(dim=-1) for layer in range(2)])
    torch.testing.assert_close(learned, expected, atol=1e-6, rtol=0)
    assert (torch.tensor(document["after"]["learned_sink_attention"]) > learned).all()
    assert "| learned-sink attention |" in text and "learned sink: the mass a row gives" in text
    with Image.open(tmp_path / "attention.png") as picture:
        assert picture.width > 400


def test_inspect_on_a_hybrid_reports_its_attention_layers_by_their_index(tmp_path, smollm2_tokenizer):
    model = tiny_lfm2(len(smollm2_tokenizer))
    with intervene.apply(model, "zerotuning", gamma=4.0) as handle:
        text, _ = inspect(model, smollm2_tokenizer, "The cat sat on the mat.", handle=handle, output=tmp_path)
        with pytest.raises(ValueError, match=r"--layers \[2\]: not softmax-attention layers of Lfm2ForCausalLM"):
            inspect(model, smollm2_tokenizer, "The cat sat.", handle=handle, layers=[2], output=tmp_path)
    document = json.loads((tmp_path / "sinks.json").read_text())
    assert document["layers"] == [1, 3] and len(document["before"]["first_token_attention"]) == 2
    assert "| 1 |" in text and "| 3 |" in text and "| 2 |" not in text


def test_inspect_draws_the_image_attention_of_a_vision_language_model(tmp_path):
    model, processor = intervene.load_model("tiny-llava", device="cpu")
    with intervene.apply(model, "pai", alpha=0.5) as handle:
        text, written = inspect(model, processor, "Is there a cat?", handle=handle, image=PICTURE, output=tmp_path)
    assert [path.name for path in written] == [
        "attention.png", "sinks.png", "image_attention.png", "summary.txt", "sinks.json"
    ]  # fmt: skip
    assert all(path.is_file() for path in written)
    with Image.open(tmp_path / "image_attention.png") as picture:
        assert picture.width > 400
    assert "sink rate" in text


def test_inspect_says_when_an_intervention_leaves_the_attention_alone(tmp_path, tiny_checkpoint):
    model, tokenizer = intervene.load_model(str(tiny_checkpoint), device="cpu")
    with intervene.apply(model, "heads", scales={3: {0: 2.0}}) as handle:  # the last layer: nothing after it
        text, _ = inspect(model, tokenizer, "The cat sat on the mat.", handle=handle, output=tmp_path)
    assert "heads leaves every attention probability as it was" in text
    assert "leaves every" not in inspect(model, tokenizer, "The cat sat.", output=tmp_path)[0]


def test_inspect_on_the_real_default_model(tmp_path):
    result = invoke("inspect", "--prompt", "The capital of France is Paris. The capital of Italy is",
                    "--method", "act", "--output-path", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {p.name for p in tmp_path.iterdir()} == {"attention.png", "sinks.png", "summary.txt", "sinks.json"}
    document = json.loads((tmp_path / "sinks.json").read_text())
    assert document["intervention"]["method"] == "act"
    first = torch.tensor(document["before"]["first_token_attention"])
    assert first.shape == (30, 9)
    assert document["before"]["sink_rate"] == pytest.approx(float((first > 0.3).float().mean()))
    assert "| 29 |" in result.output and "sink rate" in result.output
    assert "attention.png, sinks.png, summary.txt, sinks.json" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "99"], "out of range: this model has layers 0..3"),
        (["--layers", "a,b"], "give comma-separated numbers"),
        (["--heads", "0,7"], "--heads [7] out of range: this model has heads 0..3"),
        (["--image", PICTURE], "--image needs a vision-language model"),
        (["--image", "nowhere.png"], "no such file"),
        (["--image", "tests/test_inspect.py"], "--image needs a vision-language model"),
        (["--method", "actt"], "unknown method"),
        (["--method", "act", "--config", "x.json"], "at most one of"),
    ],
)
def test_inspect_bad_input(tmp_path, tiny_checkpoint, args, message):
    result = invoke("inspect", "--model", tiny_checkpoint, "--prompt", "hello there", "--output-path", tmp_path, *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_inspect_names_what_is_missing(tmp_path, tiny_checkpoint, monkeypatch):
    result = invoke("inspect", "--model", "tiny-llava", "--prompt", "hi", "--output-path", tmp_path)
    assert result.exit_code == 2 and "pass --image PATH" in result.output
    result = invoke(
        "inspect", "--model", "tiny-llava", "--prompt", "hi", "--image", "README.md", "--output-path", tmp_path
    )
    assert result.exit_code == 2 and "--image README.md cannot be read" in result.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    result = invoke("inspect", "--model", tiny_checkpoint, "--prompt", "hi", "--output-path", tmp_path)
    assert result.exit_code == 2 and "pip install 'intervene[plot]'" in result.output
