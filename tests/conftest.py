"""Tiny random models built from configs (no network), and helpers shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96


def tiny_llama(**overrides):
    config = LlamaConfig(**{
        **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        **overrides,
    })  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_qwen2(**overrides):
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, **overrides,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def tiny_gemma3(**overrides):
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=256, **overrides,
    )  # fmt: skip
    return Gemma3ForCausalLM(config)


def tiny_gpt2(**overrides):
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2,
        **overrides,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3, "gpt2": tiny_gpt2}


def build(arch: str, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = FACTORIES[arch](**overrides).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    _sharpen(model)
    return model


def _sharpen(model):
    """Random init gives near-uniform attention; scale the query projections so that rows are peaked
    and some keys become sinks, as in trained models. Deterministic given the seed."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "c_attn.weight")):
                param.mul_(6.0)


@pytest.fixture(params=list(FACTORIES))
def arch(request):
    return request.param


def left_padded(prompts: list[list[int]], pad_id: int = 0):
    """Left-pad token lists into (input_ids, attention_mask)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (length,), generator=g).tolist()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` builds them (GPT-2 has absolute positions)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    import intervene
    from intervene.evals.model import BUILTIN, cache_root

    intervene.load_model("smollm2-135m", device="cpu")  # converts the default model once if needed
    return AutoTokenizer.from_pretrained(cache_root() / BUILTIN["smollm2-135m"].cache_name)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_tokenizer):
    """A saved tiny random Llama with the default model's tokenizer: a local checkpoint directory."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    build("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory
