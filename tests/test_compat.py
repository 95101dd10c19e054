"""The seam with transformers (`hooks/compat.py`): the cache under either name, keywords never dropped,
what the edited attention returns, and models refused at `apply` for what they do."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import intervene
from intervene.hooks import compat

from conftest import build, left_padded, positions, prompt


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_a_decoder_called_with_either_name_of_the_cache_decodes_as_one_forward():
    """The decoder's own name for the cache, and `past_key_values` where a newer release still accepts it as
    a deprecated alias: either way a decoding step sees the cache (read as none, it would look like a prompt)."""
    model = build("llama")
    decoder = model.get_decoder()
    ids, mask = left_padded([prompt(9, 4), prompt(6, 5)])
    names = {compat.cache_argument(decoder.forward), "past_key_values"}  # one name on 5.17-5.23, two since 5.24
    with intervene.apply(model, "zerotuning", gamma=4.0), torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]
        for name in sorted(names):
            cache = compat.DynamicCache()
            decoder(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions(mask)[:, :-1],
                    use_cache=True, **{name: cache})  # fmt: skip
            assert compat.past_length(cache) == ids.shape[1] - 1
            hidden = decoder(
                input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions(mask)[:, -1:], use_cache=True,
                **{name: cache},
            ).last_hidden_state  # fmt: skip
            torch.testing.assert_close(model.lm_head(hidden)[:, -1], whole, atol=1e-5, rtol=1e-5)


def test_a_cache_under_a_name_the_seam_does_not_know_is_an_error_not_a_new_prompt():
    with pytest.raises(compat.UnsupportedModelError, match=r"the KV cache came as `kv_states`.*renamed it"):
        compat.find_cache({"input_ids": torch.ones(1, 1), "kv_states": compat.DynamicCache()})

    def forward(input_ids, kv_states=None, use_cache=False): ...

    with pytest.raises(compat.UnsupportedModelError, match=r"none of the names .*cache, past_key_values.*kv_states"):
        compat.cache_argument(forward)


def test_an_attention_keyword_the_edited_path_does_not_implement_is_refused_by_name():
    model = build("llama")
    ids, mask = left_padded([prompt(7, 1), prompt(5, 2)])
    with intervene.apply(model, "zerotuning", gamma=4.0, layers=[1]), torch.no_grad():
        with pytest.raises(NotImplementedError, match=r"layer 1 of LlamaAttention was called with 'key_offsets'"):
            model(input_ids=ids, attention_mask=mask, key_offsets=torch.ones(2))
        edited = model(input_ids=ids, attention_mask=mask).logits
        # the callers' own arguments reach attention too, and are not attention keywords
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_attentions=False).logits
    torch.testing.assert_close(last[:, -1], edited[:, -1], atol=1e-6, rtol=1e-6)  # one row of lm_head vs all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_edited_attention_returns_what_the_models_own_returns(dtype):
    """Same shape, dtype and layout as SDPA's output, and contiguous: some models `.view()` it."""
    model = build("llama", dtype=dtype)
    module = model.get_decoder().layers[2].self_attn
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=generator).to(dtype)
    k, v = (torch.randn(2, 2, 5, 16, generator=generator).to(dtype) for _ in range(2))
    expected, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, None, scaling=0.25)
    with intervene.apply(model, "act", beta=0.4, layers=[2]):
        out, weights = ALL_ATTENTION_FUNCTIONS[intervene.hooks.dispatch.NAME](module, q, k, v, None, scaling=0.25)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    assert weights is None
    assert (out.float() - expected.float()).abs().max() > 1e-3  # the edit did apply


def test_a_model_that_computes_differently_under_another_implementation_name_is_refused():
    """GPT-2 under eager with `reorder_and_upcast_attn` bypasses the attention interface by the implementation's
    name; under any other name it calls it, and in bf16 that rounds differently. Refused, rather than inexact."""
    model = build("gpt2", attn_implementation="eager", dtype=torch.bfloat16, reorder_and_upcast_attn=True)
    with pytest.raises(intervene.UnsupportedModelError, match=r"computes differently when its attention implementat"):
        intervene.apply(model, "zerotuning", gamma=2.0)
    assert compat.implementation(model.config) == "eager"
    fp32 = build("gpt2", attn_implementation="eager", reorder_and_upcast_attn=True)  # the same numbers in fp32
    intervene.apply(fp32, "zerotuning", gamma=2.0).remove()


def test_a_model_loaded_with_the_intervene_implementation_but_nothing_attached_says_how_to_attach():
    model = build("llama")
    model.set_attn_implementation(intervene.hooks.dispatch.NAME)
    with pytest.raises(intervene.UnsupportedModelError, match=r"no intervention attached: load the model with 'sdpa'"):
        model(input_ids=torch.tensor([prompt(4, 1)]))
