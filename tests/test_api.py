"""The public API: neutral parameters, remove/enable, composition, configs, the registry, and errors."""

import copy
import dataclasses
import gc
import json
import weakref

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

import intervene
from intervene.hooks.compat import implementation
from intervene.kernels import AttentionEdit

from conftest import build, left_padded, positions, prompt

NEUTRAL = {
    "act": dict(beta=1.0, layers="all"),
    "zerotuning": dict(gamma=1.0),
    "heads": dict(scales={0: {0: 1.0, 3: 1.0}, 2: {1: 1.0}}),
}
ACTIVE = {
    "act": dict(layers="all"),
    "zerotuning": dict(gamma=2.0, layers=[1, 2]),
    "heads": dict(scales={1: {0: 0.0, 2: 2.0}}),
}


def run(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@pytest.fixture
def batch():
    return left_padded([prompt(9, 1), prompt(4, 2), prompt(7, 3)])


@pytest.mark.parametrize("previous", ["sdpa", "eager"])
@pytest.mark.parametrize("method", list(NEUTRAL))
def test_neutral_parameters_give_the_unwrapped_logits_bit_for_bit(arch, method, previous, batch):
    model = build(arch, attn_implementation=previous)
    ids, mask = batch
    expected = run(model, ids, mask)
    with intervene.apply(model, method, **NEUTRAL[method]) as handle:
        assert implementation(model.config) == "intervene"
        assert handle.active_layers == frozenset()
        assert torch.equal(run(model, ids, mask), expected)
        with torch.no_grad():
            kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
            generated = model.generate(**kwargs)
    assert torch.equal(model.generate(**kwargs), generated)


@pytest.mark.parametrize("method", list(ACTIVE))
def test_remove_and_disable_restore_the_unwrapped_model_exactly(arch, method, batch):
    model = build(arch)
    ids, mask = batch
    expected = run(model, ids, mask)
    handle = intervene.apply(model, method, **ACTIVE[method])
    edited = run(model, ids, mask)
    assert not torch.allclose(edited, expected, atol=1e-4)
    handle.enabled = False
    assert torch.equal(run(model, ids, mask), expected)
    handle.enabled = True
    assert torch.equal(run(model, ids, mask), edited)
    handle.remove()
    handle.remove()  # idempotent
    assert implementation(model.config) == "sdpa"
    assert torch.equal(run(model, ids, mask), expected)
    assert "removed" in repr(handle)


def test_remove_leaves_no_hooks_behind():
    model = build("llama")
    hooks_before = len(model.model._forward_pre_hooks), len(model.model._forward_hooks)
    with intervene.apply(model, "act"):
        assert len(model.model._forward_pre_hooks) == hooks_before[0] + 1
    assert (len(model.model._forward_pre_hooks), len(model.model._forward_hooks)) == hooks_before


def test_a_model_dropped_without_remove_is_freed():
    model = build("llama")
    handle = intervene.apply(model, "act")
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    handle.remove()


def test_a_deep_copy_of_an_intervened_model_is_refused_rather_than_run_unedited(batch):
    model = build("llama")
    ids, mask = batch
    plain = run(model, ids, mask)
    with intervene.apply(model, "zerotuning", gamma=5.0) as handle:
        edited = run(model, ids, mask)
        with pytest.raises(TypeError, match=r"cannot deep-copy a model while an intervention is attached.*remove"):
            copy.deepcopy(model)
        handle.enabled = False  # still attached: a copy would still lose it
        with pytest.raises(TypeError, match="cannot deep-copy"):
            copy.deepcopy(model)
        handle.enabled = True
        assert torch.equal(run(model, ids, mask), edited)  # the refusal left the original as it was
    twin = copy.deepcopy(model)
    assert torch.equal(run(twin, ids, mask), plain)
    with intervene.apply(twin, "zerotuning", gamma=5.0):
        assert torch.equal(run(twin, ids, mask), edited)


def test_another_model_built_from_the_same_config_runs_unedited(batch):
    model = build("llama")
    torch.manual_seed(1)
    other = type(model)(model.config).eval()  # shares the config object, hence its attention implementation
    ids, mask = batch
    plain, expected = run(model, ids, mask), run(other, ids, mask)
    with intervene.apply(model, "zerotuning", gamma=5.0):
        assert torch.equal(run(other, ids, mask), expected)
        assert not torch.allclose(run(model, ids, mask), plain)


def test_key_biases_and_head_scales_compose(batch):
    model = build("llama")
    ids, mask = batch
    zt, hs = ACTIVE["zerotuning"], ACTIVE["heads"]
    with intervene.apply(model, "zerotuning", **zt), intervene.apply(model, "heads", **hs):
        both = run(model, ids, mask)
    with intervene.apply(model, "heads", **hs), intervene.apply(model, "zerotuning", **zt):
        assert torch.equal(run(model, ids, mask), both)
    with intervene.apply(model, "zerotuning", **zt):
        assert not torch.allclose(run(model, ids, mask), both, atol=1e-4)
    # gamma1 then gamma2 on the same heads is one bias of log(gamma1 * gamma2)
    with intervene.apply(model, "zerotuning", gamma=2.0), intervene.apply(model, "zerotuning", gamma=1.5):
        stacked = run(model, ids, mask)
    with intervene.apply(model, "zerotuning", gamma=3.0):
        torch.testing.assert_close(run(model, ids, mask), stacked, atol=1e-5, rtol=1e-5)


def test_two_redistributions_on_a_common_layer_are_refused(batch):
    model = build("llama")
    ids, mask = batch
    expected = run(model, ids, mask)
    with intervene.apply(model, "act", layers=[1, 2]):
        with pytest.raises(ValueError, match=r"active 'act' also sets redistribute on layers \[2\]"):
            intervene.apply(model, "act", layers=[2, 3])
        with intervene.apply(model, "act", layers=[3]):  # disjoint layers compose
            pass
        assert implementation(model.config) == "intervene"
    assert implementation(model.config) == "sdpa"
    assert torch.equal(run(model, ids, mask), expected)
    with pytest.raises(ValueError, match="do not commute"):
        AttentionEdit(redistribute=object()) + AttentionEdit(redistribute=object())


def test_removing_one_of_two_keeps_the_other(batch):
    model = build("llama")
    ids, mask = batch
    with intervene.apply(model, "zerotuning", **ACTIVE["zerotuning"]):
        only_zt = run(model, ids, mask)
    first = intervene.apply(model, "zerotuning", **ACTIVE["zerotuning"])
    second = intervene.apply(model, "heads", **ACTIVE["heads"])
    second.remove()
    assert implementation(model.config) == "intervene"
    assert torch.equal(run(model, ids, mask), only_zt)
    first.remove()
    assert implementation(model.config) == "sdpa"


def test_saved_configs_replay_exactly(tmp_path, batch):
    model = build("qwen2")
    ids, mask = batch
    with intervene.apply(model, "act", beta=0.3, heads={2: [1, 0], 1: [3]}) as handle:
        assert handle.config.layers == (1, 2)
        assert handle.config.heads == {2: (0, 1), 1: (3,)}
        expected = run(model, ids, mask)
        handle.save(tmp_path / "act.json")
    saved = json.loads((tmp_path / "act.json").read_text())
    assert saved["method"] == "act" and saved["params"]["layers"] == [1, 2]
    assert saved["model"]["num_layers"] == 4
    config = intervene.load_config(tmp_path / "act.json")
    with intervene.apply(model, config) as handle:
        assert handle.config == config.resolve(intervene.hooks.model_spec(model))
        assert torch.equal(run(model, ids, mask), expected)
    with intervene.apply(model, "act", config=tmp_path / "act.json") as handle:
        assert torch.equal(run(model, ids, mask), expected)
    with intervene.apply(model, config, beta=1.0) as handle:  # keyword parameters override a config
        assert handle.config.beta == 1.0 and handle.active_layers == frozenset()
    with pytest.raises(ValueError, match="for method 'act', not 'zerotuning'"):
        intervene.apply(model, "zerotuning", config=tmp_path / "act.json")


def test_a_config_saved_for_another_model_shape_is_refused(tmp_path):
    with intervene.apply(build("llama"), "zerotuning", gamma=2.0) as handle:
        handle.save(tmp_path / "zt.json")
    bigger = build("llama", num_hidden_layers=6)
    bigger.name_or_path = "bigger-llama"
    expected = r"saved for .*\(4 layers x 4 heads\), not for bigger-llama \(6 layers x 4 heads\)"
    with pytest.raises(ValueError, match=expected):
        intervene.apply(bigger, intervene.load_config(tmp_path / "zt.json"))
    with pytest.raises(ValueError, match=expected):
        intervene.apply(bigger, "zerotuning", config=tmp_path / "zt.json")
    assert implementation(bigger.config) == "sdpa"


def test_methods_lists_the_builtins_and_register_adds_one(batch, monkeypatch):
    monkeypatch.setattr(intervene.interventions.base, "_REGISTRY", dict(intervene.interventions.base._REGISTRY))
    listed = intervene.methods()
    assert {"act", "zerotuning", "heads"} <= set(listed)
    assert all(isinstance(text, str) and text for text in listed.values())

    @intervene.register("mute_heads_test")
    @dataclasses.dataclass(frozen=True)
    class Mute(intervene.Method):
        """Zero the outputs of every head in one layer."""

        layer: int = 0

        def active_layers(self):
            return frozenset({self.layer})

        def edit(self, call, state):
            return AttentionEdit(head_scale=torch.zeros(1, call.query.shape[1]))

    assert intervene.methods()["mute_heads_test"] == "Zero the outputs of every head in one layer."
    model = build("llama")
    ids, mask = batch
    with intervene.apply(model, "mute_heads_test", layer=1):
        muted = run(model, ids, mask)
    with intervene.apply(model, "heads", scales={1: {h: 0.0 for h in range(4)}}):
        torch.testing.assert_close(run(model, ids, mask), muted, atol=1e-5, rtol=1e-5)

    with pytest.raises(TypeError, match="frozen dataclass"):

        @intervene.register("mutable_test")
        @dataclasses.dataclass
        class Mutable(intervene.Method):
            pass


@pytest.mark.parametrize(
    "method, params, message",
    [
        (
            "actt",
            {},
            r"unknown method 'actt'; known methods: act, causalmm, heads, pai, prune, var, vcd, vhr, zerotuning",
        ),
        ("act", {"beta": 1.5}, r"act: beta=1.5 is out of range; it must lie in \[0.0, 1.0\]"),
        ("act", {"threshold": 0}, r"act: threshold=0 is out of range; it must lie in \(0.0, 1.0\]"),
        ("act", {"decode": "always"}, r"decode='always' is not one of frozen, online, off"),
        ("act", {"layers": [2, 4]}, r"act: layer 4 is out of range; this model has layers 0..3"),
        ("act", {"heads": {2: [4]}}, r"head 4 of layer 2 is out of range; this model has query heads 0..3"),
        ("act", {"layers": [2], "heads": {1: [0]}}, r"heads are given for layer 1, which is not among layers=\[2\]"),
        ("act", {"alpha": 5}, r"unknown parameter 'alpha' for method 'act'; its parameters are: beta, threshold"),
        ("zerotuning", {"gamma": 0.0}, r"zerotuning: gamma=0.0 is out of range; it must lie in \(0.0, inf\]"),
        ("zerotuning", {"gamma": float("nan")}, r"gamma must be a finite number, got nan"),
        ("zerotuning", {}, r"method 'zerotuning' needs the parameter 'gamma' \(e.g. gamma=...\)"),
        ("heads", {"scales": [1.0]}, r"scales must be a mapping \{layer: \{head: weight\}\}"),
        ("heads", {"scales": {7: {0: 0.5}}}, r"heads: layer 7 is out of range"),
        ("heads", {"scales": {1: {"a": 2.0}}}, r"keyed by layer and head indices, got scales\[1\]\['a'\]"),
        ("act", {"layers": "2,3"}, r"act: layers must be 'auto', 'all', a layer index or a list .*got '2,3'"),
        ("act", {"layers": 2.5}, r"act: layers must be .* such as \[2, 3\] .*got 2.5"),
        ("act", {"heads": {"x": [0]}}, r"heads must map layer indices to lists of query heads .*got 'x': \[0\]"),
        ("act", {"heads": {2: "all"}}, r"heads must map layer indices to lists of query heads .*got 2: 'all'"),
        ("pai", {"cfg_cutoff": 0}, r"pai: cfg_cutoff=0 is out of range; it must lie in \(0.0, 1.0\]"),
        ("pai", {"official_first_token": "yes"}, r"pai: official_first_token must be true or false, got 'yes'"),
        ("vcd", {"noise_step": 1000}, r"vcd: noise_step=1000 is out of range; it must lie in \[0, 999\]"),
        ("vcd", {"noise_step": 2.5}, r"vcd: noise_step must be a whole number of diffusion steps, got 2.5"),
        ("causalmm", {"counterfactual": "mirror"}, r"counterfactual='mirror' is not one of uniform, reverse, random"),
        ("causalmm", {"where": "ViT"}, r"causalmm: where='ViT' is not one of llm, vision, both"),
        ("causalmm", {"epsilon": 0}, r"causalmm: epsilon=0 is out of range"),
        ("vcd", {}, r"vcd acts on image tokens, and .* is a text-only model"),
    ],
)
def test_bad_input_names_the_value_and_the_fix(method, params, message):
    model = build("llama")
    with pytest.raises(ValueError, match=message):
        intervene.apply(model, method, **params)
    assert implementation(model.config) == "sdpa"


def test_models_outside_the_attention_interface_are_refused():
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(intervene.UnsupportedModelError, match="BloomForCausalLM does not compute attention through"):
        intervene.apply(bloom, "act")
    with pytest.raises(intervene.UnsupportedModelError, match="not a transformers PreTrainedModel"):
        intervene.apply(torch.nn.Linear(2, 2), "act")
    model = build("llama")
    model.set_attn_implementation("flex_attention")
    expected = r"runs 'flex_attention' attention.*set_attn_implementation"
    with pytest.raises(intervene.UnsupportedModelError, match=expected):
        intervene.apply(model, "act")
