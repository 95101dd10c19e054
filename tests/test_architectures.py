"""Every popular decoder family, as a tiny random model: it either works on every check or is refused at
`apply` with the reason, before anything is attached. A hybrid (linear-attention, state-space or convolution
layers beside its softmax attention) passes the same checks, edited on its softmax-attention layers only.

The checks: neutral parameters and `remove()` give the unwrapped logits bit for bit; ACT and ZeroTuning
change them; ZeroTuning's cached `generate` (dynamic and static cache, a left-padded batch, a sliding window
shorter than the sequence where the family has one) equals one forward over the whole sequence; ACT
generates on a left-padded batch, each row as it would alone.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

import intervene
from intervene.hooks import model_spec
from intervene.hooks.compat import implementation

from conftest import left_padded, positions, prompt

COMMON = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
WINDOW = dict(sliding_window=6)  # shorter than every sequence below (12 prompt tokens, then 6 generated)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
MLA = dict(
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
    moe_intermediate_size=32,
)  # fmt: skip

# model_type -> what its tiny config needs beyond COMMON
SUPPORTED = {
    "llama": {},
    "mistral": WINDOW,
    "mixtral": {**WINDOW, **MOE},
    "qwen2": {**WINDOW, "use_sliding_window": True, "max_window_layers": 2},  # layers 2, 3 slide
    "qwen3": {"head_dim": 16},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gemma": {"head_dim": 16},
    "gemma3_text": {**WINDOW, "head_dim": 16},
    "phi": {},
    "phi3": WINDOW,
    "gpt2": {},
    "gpt_neox": {},
    "olmo2": {},
    "granite": {},
    "cohere": {},
    "cohere2": WINDOW,
    "stablelm": {},
    "starcoder2": WINDOW,
    "deepseek_v3": MLA,  # value heads of another size than the query/key heads
    "smollm3": {},
    "llama4_text": {"head_dim": 16, **MOE, "intermediate_size_mlp": 96, "attention_chunk_size": 6},
    "jetmoe": {**MOE, "kv_channels": 16},  # these two `.view()` the attention output: it must be contiguous
    "afmoe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    # eager only (sdpa has neither): logits soft-capped, at a cap low enough to bend these tiny logits
    "gemma2": {**WINDOW, "head_dim": 16, "attn_logit_softcapping": 0.5},
    "gpt_oss": {**WINDOW, "head_dim": 16, "num_local_experts": 4},  # a learned sink logit per head (s_aux)
}
EAGER = {"gemma2", "gpt_oss"}  # families transformers runs under eager attention only

# Hybrids: softmax attention at layers 1 and 2 (Jamba: 0 and 2), so that ACT's "auto" (layers 2..L-2) edits one,
# and linear attention, state-space, convolution or MLP-only layers around them, which are left alone.
MIXED = ["linear_attention", "full_attention", "full_attention", "linear_attention"]
CONV = ["conv", "full_attention", "full_attention", "conv"]
LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
MAMBA_2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16)
JAMBA = dict(
    num_experts=4, attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1,
    mamba_d_state=8,
)  # fmt: skip
NEMOTRON_H = dict(
    head_dim=16, mamba_num_heads=4, mamba_head_dim=32, n_groups=1, ssm_state_size=16,
    layers_block_type=["mamba", "attention", "attention", "mlp"],
)  # fmt: skip
QWEN3_NEXT = dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **LINEAR)
HYBRID = {
    "qwen3_next": {**QWEN3_NEXT, "layer_types": MIXED},
    "qwen3_5_text": {"head_dim": 16, **LINEAR, "layer_types": MIXED},
    "jamba": JAMBA,
    "granitemoehybrid": {**MOE, **MAMBA_2, "layer_types": ["mamba", "attention", "attention", "mamba"]},
    "bamba": {**MAMBA_2, "attn_layer_indices": [1, 2]},
    "nemotron_h": NEMOTRON_H,
    "kimi_linear": {"head_dim": 16, "num_key_value_heads": 4, "layer_types": MIXED},
    "lfm2": {"layer_types": CONV},
    "lfm2_moe": {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "num_dense_layers": 1,
                 "layer_types": CONV},
    "falcon_h1": {"head_dim": 16, **MAMBA_2, "mamba_d_ssm": 128},  # every layer: attention and Mamba-2 side by side
}  # fmt: skip
EDITABLE = {**SUPPORTED, **HYBRID}
# Zamba2's hybrid layers share one attention block (layer_idx -1), so intervene cannot tell its layers apart
ZAMBA_2 = dict(
    layers_block_type=["mamba", "hybrid", "hybrid", "mamba"], mamba_d_state=16, n_mamba_heads=4, mamba_headdim=32,
    attention_head_dim=16,
)  # fmt: skip
SPARSE = dict(MLA, index_topk=4, index_n_heads=2, index_head_dim=16)

# model_type -> (tiny config, attention implementation, what the refusal must say)
REFUSED = {
    "falcon": ({}, "sdpa", r"FalconForCausalLM does not compute attention through transformers' AttentionInterface"),
    "bloom": ({}, "eager", r"BloomForCausalLM does not compute attention through"),
    "deepseek_v32": (SPARSE, "sdpa", r"`indices` \(the keys a sparse indexer selected"),
    "glm_moe_dsa": (SPARSE, "sdpa", r"GlmMoeDsaForCausalLM passes .*`indices`"),
    "zamba2": (ZAMBA_2, "sdpa", r"Zamba2Attention is called for more than one layer"),
    "xlstm": (
        {"num_heads": 4, "qk_dim_factor": 1.0, "v_dim_factor": 1.0},
        "eager",
        r"xLSTMForCausalLM ran no attention through transformers' AttentionInterface",
    ),
}
# transformers before 5.20 cannot generate with a static cache on chunked attention at all (a TypeError in its
# masking_utils, with or without intervene): there the test checks that this is still transformers' own failure.
STATIC_CACHE_SINCE = {"llama4_text": Version("5.20")}

SEQ2SEQ = {
    "t5": {"d_model": 64, "d_ff": 96, "num_layers": 2, "num_heads": 4, "d_kv": 16},
    "bart": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
             "decoder_attention_heads": 4},
}  # fmt: skip


def tiny(model_type: str, extra: dict, implementation: str | None = None, auto=AutoModelForCausalLM):
    implementation = implementation or ("eager" if model_type in EAGER else "sdpa")
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**COMMON, **extra})
    return auto.from_config(config, attn_implementation=implementation).eval()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@pytest.fixture(scope="module")
def batch():
    return left_padded([prompt(12, 1), prompt(8, 2)])


@pytest.mark.parametrize("family", list(EDITABLE))
def test_neutral_parameters_and_remove_are_exact_and_edits_change_the_logits(family, batch):
    model = tiny(family, EDITABLE[family])
    ids, mask = batch
    plain = logits(model, ids, mask)
    settings = (("act", {"beta": 1.0}, {"beta": 0.2}), ("zerotuning", {"gamma": 1.0}, {"gamma": 4.0}))
    for method, neutral, edit in settings:
        with intervene.apply(model, method, **neutral):
            assert torch.equal(logits(model, ids, mask), plain)
        with intervene.apply(model, method, **edit):
            edited = logits(model, ids, mask)
        assert (edited - plain).abs().max() > 1e-3, f"{method} left {family} unchanged"
        assert torch.equal(logits(model, ids, mask), plain)  # after remove()


@pytest.mark.parametrize("family", list(EDITABLE))
def test_the_edited_path_with_nothing_to_move_equals_the_models_own_attention(family, batch):
    """ACT with a threshold no key's mean attention passes finds no sink: every attention layer runs intervene's
    attention (its soft-capping and learned sinks included) and leaves every row as it is. Compared at real
    tokens: a padding row sees no key, which eager attention averages over every key and intervene's gives zero."""
    model = tiny(family, EDITABLE[family])
    ids, mask = batch
    plain = logits(model, ids, mask)
    with intervene.apply(model, "act", threshold=1.0, layers="all") as handle:
        edited = logits(model, ids, mask)
    assert handle.active_layers == set(model_spec(model).attention_layers)
    real = mask.bool()
    torch.testing.assert_close(edited[real], plain[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(EDITABLE))
def test_zerotuning_cached_generation_equals_one_full_forward(family, batch):
    model = tiny(family, EDITABLE[family])
    ids, mask = batch
    new = 6
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)  # fmt: skip
    caches = ["dynamic", "static"]
    if Version(transformers.__version__) < STATIC_CACHE_SINCE.get(family, Version("0")):
        caches.remove("static")
        with pytest.raises(TypeError, match="create_chunked_causal_mask"), torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
    with intervene.apply(model, "zerotuning", gamma=4.0):
        for cache in caches:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, cache_implementation=cache, **kwargs)
            cached = torch.stack(out.logits, dim=1)  # [B, new, V]
            whole = torch.cat([mask, mask.new_ones(mask.shape[0], new)], dim=1)
            full = logits(model, out.sequences, whole)[:, ids.shape[1] - 1 : -1]
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5, msg=lambda m, c=cache: f"{c} cache: {m}")


@pytest.mark.parametrize("family", list(EDITABLE))
def test_act_generates_on_a_left_padded_batch_as_each_row_alone(family, batch):
    model = tiny(family, EDITABLE[family])
    ids, mask = batch
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)  # fmt: skip
    with intervene.apply(model, "act", beta=0.4), torch.no_grad():
        together = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model.generate(input_ids=ids[row : row + 1, real], **kwargs)
            assert torch.equal(alone.sequences[0, -4:], together.sequences[row, -4:])
            torch.testing.assert_close(
                torch.stack(alone.logits)[:, 0], torch.stack(together.logits)[:, row], atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize("family", list(REFUSED))
def test_unsupported_families_are_refused_at_apply_with_the_reason(family, batch):
    extra, backend, reason = REFUSED[family]
    model = tiny(family, extra, backend)
    ids, mask = batch
    plain = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(intervene.UnsupportedModelError, match=reason):
        intervene.apply(model, "act")
    assert implementation(model.config) == backend  # nothing attached, nothing switched
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)


@pytest.mark.parametrize("family", list(SEQ2SEQ))
def test_encoder_decoders_are_refused_for_what_they_are(family):
    model = tiny(family, SEQ2SEQ[family], auto=AutoModelForSeq2SeqLM)
    with pytest.raises(intervene.UnsupportedModelError, match=r"is an encoder-decoder model; intervene edits the"):
        intervene.apply(model, "zerotuning", gamma=2.0)


def test_zerotuning_on_learned_sinks_equals_raising_the_models_sink_logits(batch):
    """target="learned_sink": a log(gamma) bias on each selected head's sink logit, which is what adding log(gamma)
    to gpt-oss's own `sinks` parameter does; the initial token is left alone."""
    model = tiny("gpt_oss", SUPPORTED["gpt_oss"])
    ids, mask = batch
    real = mask.bool()
    heads = {1: [0, 3], 2: [1]}
    with intervene.apply(model, "zerotuning", gamma=3.0, target="learned_sink", heads=heads):
        scaled = logits(model, ids, mask)
    raised = copy.deepcopy(model)
    with torch.no_grad():
        for layer, chosen in heads.items():
            raised.model.layers[layer].self_attn.sinks[chosen] += math.log(3.0)
    torch.testing.assert_close(scaled[real], logits(raised, ids, mask)[real], atol=1e-5, rtol=1e-5)
    assert (scaled - logits(model, ids, mask))[real].abs().max() > 1e-3


def test_zerotuning_on_learned_sinks_is_refused_where_there_are_none():
    model = tiny("llama", SUPPORTED["llama"])
    with pytest.raises(ValueError, match=r"target='learned_sink' scales learned attention sinks, and this model's"):
        intervene.apply(model, "zerotuning", gamma=2.0, target="learned_sink")
    with pytest.raises(ValueError, match=r"target='sink' is not one of 'initial', 'learned_sink'"):
        intervene.apply(model, "zerotuning", gamma=2.0, target="sink")


def test_a_hybrid_resolves_layers_to_its_softmax_attention_layers_and_refuses_the_others_by_name(tmp_path):
    def resolved(model, method, **params):
        with intervene.apply(model, method, **params) as handle:
            return handle.config

    model = tiny("lfm2", {"num_hidden_layers": 6, "layer_types": ["conv", "conv", "full_attention", "conv",
                                                                  "full_attention", "conv"]})  # fmt: skip
    assert resolved(model, "act").layers == (2, 4)  # 2..L-2 = [2, 3, 4], attention layers only
    assert resolved(model, "zerotuning", gamma=2.0).layers == (2, 4)  # "all"
    assert resolved(model, "act", heads=[1]).heads == {2: (1,), 4: (1,)}
    with pytest.raises(ValueError, match=r"act: layer 3 of Lfm2ForCausalLM is a conv layer, not softmax attention; "
                                         r"its attention layers are \[2, 4\]"):  # fmt: skip
        intervene.apply(model, "act", layers=[2, 3])
    with pytest.raises(ValueError, match=r"zerotuning: layer 0 of Lfm2ForCausalLM is a conv layer"):
        intervene.apply(model, "zerotuning", gamma=2.0, heads={0: [1], 2: [1]})
    with pytest.raises(ValueError, match=r"out of range; this model has layers 0..5"):
        intervene.apply(model, "act", layers=[6])
    with intervene.apply(model, "zerotuning", gamma=2.0) as handle:
        handle.save(tmp_path / "zerotuning.json")
    saved = intervene.load_config(tmp_path / "zerotuning.json")
    assert saved.saved_for["attention_layers"] == [2, 4]
    assert resolved(model, saved) == handle.config
    other = tiny("lfm2", {"num_hidden_layers": 6, "layer_types": ["full_attention", *["conv"] * 5]})
    with pytest.raises(ValueError, match=r"6 layers x 4 heads, attention layers \[2, 4\]\), not for"):
        intervene.apply(other, saved)
    with pytest.raises(ValueError, match=r"act: layers='auto' means layers \[2, 3, 4\] of Lfm2ForCausalLM, none of"):
        intervene.apply(other, "act")
    assert implementation(model.config) == implementation(other.config) == "sdpa"  # every refusal left no trace


def test_a_layer_that_runs_no_attention_is_refused_unless_the_config_declares_it_another_kind():
    model = tiny("lfm2", HYBRID["lfm2"])
    model.config.layer_types[0] = "full_attention"  # the model still has its convolution there
    declared = r"\[0\] ran no attention through AttentionInterface \(config.layer_types declares them \['full_att"
    with pytest.raises(intervene.UnsupportedModelError, match=declared):
        intervene.apply(model, "act")
    assert implementation(model.config) == "sdpa"
