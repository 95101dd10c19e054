"""Each method on tiny Llama (GQA), Qwen2, Gemma3 (sliding window) and GPT-2 models, against the
official operations transcribed on explicit probabilities, and under padding, batching and caching."""

import pytest
import torch

import intervene
from intervene.hooks.compat import implementation

import oracles
from conftest import build, cache_kwarg, left_padded, positions, prompt

PROMPTS = [prompt(6, 1), prompt(3, 2), prompt(5, 3)]  # within Gemma3's window: the official ACT has none


def logits(model, ids, mask, **kwargs):
    position_ids = None if mask is None else positions(mask)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs).logits


def oracle_logits(model, name, ids, mask):
    previous = implementation(model.config)
    model.set_attn_implementation(name)
    try:
        return logits(model, ids, mask)
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("beta, threshold", [(0.4, 0.1), (0.0, 0.05), (0.7, 0.2)])
def test_act_prefill_equals_the_official_operation(arch, beta, threshold):
    model = build(arch)
    ids, mask = left_padded(PROMPTS)
    official = lambda A, layer: oracles.official_act(A, beta, threshold)
    name = oracles.register_oracle(f"oracle_act_{beta}_{threshold}", official)
    expected = oracle_logits(model, name, ids, mask)
    baseline = logits(model, ids, mask)
    with intervene.apply(model, "act", beta=beta, threshold=threshold, layers="all"):
        ours = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)
    assert (ours[real] - baseline[real]).abs().max() > 1e-2  # sinks were found and calibrated


def test_act_default_layers_are_2_to_L_minus_2():
    model = build("llama")
    with intervene.apply(model, "act") as handle:
        assert handle.config.layers == (2,)  # 4 layers: 2..L-2
    model = build("llama", num_hidden_layers=8)
    with intervene.apply(model, "act") as handle:
        assert handle.config.layers == (2, 3, 4, 5, 6)


def test_act_heads_restrict_the_edit_to_those_query_heads():
    model = build("llama")
    ids, mask = left_padded(PROMPTS)
    heads = {1: [1], 2: [0, 3]}
    name = oracles.register_oracle(
        "oracle_act_heads",
        lambda A, layer: torch.where(
            torch.isin(torch.arange(4), torch.tensor(heads.get(layer, [])))[:, None, None],
            oracles.official_act(A, 0.4, 0.1),
            A,
        ),
    )
    with intervene.apply(model, "act", heads=heads) as handle:
        assert handle.config.layers == (1, 2)
        ours = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], oracle_logits(model, name, ids, mask)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.3, 2.5])
def test_zerotuning_equals_scaling_the_first_real_token_and_renormalising(arch, gamma):
    model = build(arch)
    ids, mask = left_padded([prompt(14, 1), prompt(9, 2)])  # past Gemma3's window of 6
    heads = [0, 2]
    name = oracles.register_oracle(
        f"oracle_zerotuning_{gamma}", lambda A, layer: oracles.zerotuning(A, gamma, heads) if layer in (1, 3) else A
    )
    with intervene.apply(model, "zerotuning", gamma=gamma, heads={1: heads, 3: heads}):
        ours = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], oracle_logits(model, name, ids, mask)[real], atol=1e-5, rtol=1e-5)


def test_head_scaling_multiplies_the_inputs_of_the_output_projection():
    model = build("llama")
    ids, mask = left_padded(PROMPTS)
    seen = {}
    o_proj = model.model.layers[1].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0].clone()))
    weights = {0: 0.0, 2: 3.0}
    with intervene.apply(model, "heads", scales={1: weights}):
        logits(model, ids, mask)
    scaled = seen["x"]
    logits(model, ids, mask)
    hook.remove()
    plain = seen["x"].view(*scaled.shape[:2], 4, -1)
    factor = torch.tensor([weights.get(h, 1.0) for h in range(4)])[:, None]
    torch.testing.assert_close(scaled.view_as(plain), plain * factor, atol=1e-5, rtol=1e-5)


METHODS = {
    "act": dict(layers="all"),
    "zerotuning": dict(gamma=3.0, heads={0: [1], 2: [0, 3]}),
    "heads": dict(scales={1: {0: 0.5, 3: 2.0}, 3: {2: 0.0}}),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_prompt_alone_and_inside_a_left_padded_batch_give_the_same_logits(arch, method):
    model = build(arch)
    batch = [prompt(5, 7), prompt(11, 8), prompt(2, 9)]
    ids, mask = left_padded(batch)
    with intervene.apply(model, method, **METHODS[method]):
        together = logits(model, ids, mask)
        assert torch.isfinite(together).all()  # padding rows see no key: zero output, never NaN
        for row, tokens in enumerate(batch):
            alone = logits(model, torch.tensor([tokens]), None)[0]
            torch.testing.assert_close(together[row, -len(tokens) :], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["zerotuning", "heads"])
def test_static_edits_give_the_same_logits_with_a_kv_cache(arch, method):
    """Prefill, then decode one token at a time through the cache == one forward over everything."""
    model = build(arch)
    full_ids, full_mask = left_padded([prompt(13, 4), prompt(9, 5)])
    prefill = 7
    with intervene.apply(model, method, **METHODS[method]):
        expected = logits(model, full_ids, full_mask)
        position_ids = positions(full_mask)
        with torch.no_grad():
            out = model(
                input_ids=full_ids[:, :prefill],
                attention_mask=full_mask[:, :prefill],
                position_ids=position_ids[:, :prefill],
                use_cache=True,
            )
            steps = [out.logits]
            for t in range(prefill, full_ids.shape[1]):
                out = model(
                    input_ids=full_ids[:, t : t + 1],
                    attention_mask=full_mask[:, : t + 1],
                    position_ids=position_ids[:, t : t + 1],
                    **cache_kwarg(model, out),
                    use_cache=True,
                )
                steps.append(out.logits)
    cached = torch.cat(steps, dim=1)
    real = full_mask.bool()
    torch.testing.assert_close(cached[real], expected[real], atol=1e-5, rtol=1e-5)


def test_act_column_means_accumulate_over_prompt_chunks():
    """Prefilling in two chunks through the cache gives the column statistics and sinks of one prefill:
    with ACT on the last layer only, the second chunk's logits equal those of the single forward."""
    model = build("llama")
    ids, mask = left_padded([prompt(12, 4), prompt(8, 5)])
    with intervene.apply(model, "act", layers=[3], threshold=0.08) as handle:
        whole = logits(model, ids, mask)
        expected = handle.state
        with torch.no_grad():
            first = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
            after_first = handle.state.stats[3].counts
            second = model(input_ids=ids[:, 6:], attention_mask=mask, **cache_kwarg(model, first))
        state = handle.state
    assert after_first.shape[-1] == 6 and state.stats[3].counts.shape[-1] == 12
    torch.testing.assert_close(state.stats[3].counts, expected.stats[3].counts)
    torch.testing.assert_close(state.stats[3].sums, expected.stats[3].sums, atol=1e-6, rtol=1e-6)
    assert torch.equal(state.sinks[3].mask, expected.sinks[3].mask) and state.sinks[3].mask.any()
    torch.testing.assert_close(second.logits, whole[:, 6:], atol=1e-5, rtol=1e-5)


def _decode_step(model, ids, mask, method_kwargs):
    """Logits of one decode step after a prompt, and the handle's state."""
    with intervene.apply(model, "act", layers="all", **method_kwargs) as handle:
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
            step = model(input_ids=ids[:, -1:], attention_mask=mask, **cache_kwarg(model, out))
        return step.logits[:, -1], handle.state


def test_act_decode_modes():
    model = build("llama")
    ids, mask = left_padded([prompt(10, 4), prompt(7, 5)])
    frozen, state = _decode_step(model, ids, mask, dict(decode="frozen"))
    online, _ = _decode_step(model, ids, mask, dict(decode="online"))
    off, _ = _decode_step(model, ids, mask, dict(decode="off"))
    for layer in range(4):
        assert state.sinks[layer].mask.any()
    # "off" leaves the generated row alone: the same as switching ACT off for the step
    with intervene.apply(model, "act", layers="all") as handle, torch.no_grad():
        out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        handle.enabled = False
        plain = model(input_ids=ids[:, -1:], attention_mask=mask, **cache_kwarg(model, out))
    torch.testing.assert_close(off, plain.logits[:, -1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(frozen, off, atol=1e-4) and not torch.allclose(online, off, atol=1e-4)
    assert not torch.allclose(frozen, online, atol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_with_a_kv_cache_and_left_padding(arch, method):
    model = build(arch)
    ids, mask = left_padded([prompt(9, 4), prompt(4, 5)])
    with intervene.apply(model, method, **METHODS[method]), torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
            pad_token_id=0, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    assert out.sequences.shape == (2, ids.shape[1] + 6)
    assert all(torch.isfinite(score).all() for score in out.scores)


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_with_a_static_cache_equals_a_dynamic_one(arch, method):
    """A static cache hands attention its empty slots (and no mask when nothing is padded) and the decoder
    4-D masks: edits must still see only the written keys and know which tokens are padding."""
    model = build(arch)
    padded = left_padded([prompt(9, 4), prompt(4, 5)])
    alone = (torch.tensor([prompt(4, 5)]), None)
    with intervene.apply(model, method, **METHODS[method]), torch.no_grad():
        for ids, mask in (padded, alone):
            scores = {
                cache: torch.stack(
                    model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                        output_scores=True, return_dict_in_generate=True, cache_implementation=cache,
                    ).scores
                )
                for cache in ("dynamic", "static")
            }  # fmt: skip
            torch.testing.assert_close(scores["static"], scores["dynamic"], atol=1e-5, rtol=1e-5)
