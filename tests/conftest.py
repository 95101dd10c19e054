"""Tiny random models built from configs (no network), and helpers shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter; set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
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

from intervene.hooks.compat import cache_argument, output_cache

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


def cache_kwarg(model, outputs) -> dict:
    """The keyword argument that hands `outputs`' KV cache to `model`'s next call, under the name its
    transformers release uses (`cache` since 5.24, `past_key_values` before)."""
    return {cache_argument(model.forward): output_cache(outputs)}


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
    build("llama", vocab_size=len(smollm2_tokenizer), max_position_embeddings=1024).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory


def tiny_lfm2(vocab_size: int):
    """A tiny random LFM2, a hybrid: softmax attention at layers 1 and 3, convolutions at layers 0, 2 and 4."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(0)
    config = Lfm2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention", "conv", "full_attention", "conv"],
    )  # fmt: skip
    return Lfm2ForCausalLM(config).eval()


# --- tiny vision-language models ------------------------------------------------------------------

IMAGE_TOKEN = 90
VLM_TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
VLM_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny_llava():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config=LlamaConfig(**VLM_TEXT), vision_config=CLIPVisionConfig(**VLM_VISION, image_size=32, patch_size=8),
        image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu", vision_feature_layer=-1,
    )  # fmt: skip
    return LlavaForConditionalGeneration(config), 16  # 16 image tokens (4 x 4 patches, CLS dropped)


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(**VLM_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=IMAGE_TOKEN, vision_start_token_id=91, vision_end_token_id=92,
    )  # fmt: skip
    return Qwen2VLForConditionalGeneration(config), 4  # a 16 x 16 image: 4 x 4 patches merged 2 x 2


def tiny_idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    config = Idefics3Config(
        text_config=LlamaConfig(**VLM_TEXT), vision_config=dict(**VLM_VISION, image_size=32, patch_size=8),
        image_token_id=IMAGE_TOKEN, scale_factor=2,
    )  # fmt: skip
    return Idefics3ForConditionalGeneration(config), 4  # 16 patches, pixel-shuffled by 2 x 2


def tiny_smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    config = SmolVLMConfig(
        text_config=LlamaConfig(**VLM_TEXT), vision_config=dict(**VLM_VISION, image_size=32, patch_size=8),
        image_token_id=IMAGE_TOKEN, scale_factor=2,
    )  # fmt: skip
    return SmolVLMForConditionalGeneration(config), 4


def tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(**VLM_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                           fullatt_block_indexes=[1]),
        image_token_id=IMAGE_TOKEN, vision_start_token_id=91, vision_end_token_id=92,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config), 4


def tiny_llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(**VLM_TEXT),
        vision_config=SiglipVisionConfig(**VLM_VISION, image_size=32, patch_size=8),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-1, image_grid_pinpoints=[[32, 32]],
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config), 36  # base 4 x 4, one 4 x 4 crop, 4 row newlines


def tiny_gemma3_vlm():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = Gemma3TextConfig(
        **VLM_TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=SiglipVisionConfig(**VLM_VISION, image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=91, eoi_token_index=92,
    )  # fmt: skip
    model = Gemma3ForConditionalGeneration(config)
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():  # initialised to zeros, which would give every image the same (null) tokens
        drawn = torch.randn(projection.shape, generator=torch.Generator().manual_seed(0))
        projection.copy_(drawn * projection.shape[0] ** -0.5)  # [vision hidden, text hidden]
    return model, 4  # 4 x 4 patches, average-pooled 2 x 2


def tiny_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=dict(**VLM_TEXT, head_dim=16, rope_parameters=rope),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=IMAGE_TOKEN, vision_start_token_id=91, vision_end_token_id=92,
    )  # fmt: skip
    return Qwen3VLForConditionalGeneration(config), 4  # as Qwen2-VL; deepstack adds into decoder layers 0 and 1


VLM_FACTORIES = {
    "llava": tiny_llava,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
    "gemma3": tiny_gemma3_vlm,
    "qwen3_vl": tiny_qwen3_vl,
}


def _portable_vision_tower(model, seed: int):
    """Vision towers initialise with truncated normals, which torch releases draw differently (2.6 and 2.13
    give other patch embeddings from one seed). Redraw the tower's matrices from plain normals (LeCun
    scale), so that a fixture, and so which heads a gate picks, is the same on every supported torch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[1] in ("vision_tower", "vision_model", "visual") and param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * fan_in**-0.5)


class TinyVLM:
    """A tiny random VLM of one family and a way to build its inputs for prompts of text around one image."""

    def __init__(self, family: str, seed: int = 0):
        torch.manual_seed(seed)
        self.family = family
        model, self.image_tokens = VLM_FACTORIES[family]()
        self.model = model.eval()
        _portable_vision_tower(self.model, seed)
        _sharpen(self.model)

    def sample(self, before: list[int], after: list[int]) -> list[int]:
        """One prompt's tokens: text, the image tokens (inside the family's markers), text."""
        before, after = ([t % IMAGE_TOKEN for t in text] for text in (before, after))  # no stray image tokens
        image = [IMAGE_TOKEN] * self.image_tokens
        if self.family.startswith("qwen") or self.family == "gemma3":
            image = [91, *image, 92]
        return [1, *before, *image, *after]

    def inputs(self, prompts: list[list[int]], image_seeds: list[int] | None = None) -> dict:
        """Left-padded model inputs for `prompts` (each holding one image); image i has pixels seeded by
        `image_seeds[i]` (default i), so a sample alone can get the same image as in a batch."""
        ids, mask = left_padded(prompts)
        seeds = range(len(prompts)) if image_seeds is None else image_seeds
        shape = {"llava": (3, 32, 32), "llava_onevision": (2, 3, 32, 32), "idefics3": (1, 3, 32, 32)}
        shape["smolvlm"] = shape["idefics3"]
        shape["gemma3"] = shape["llava"]
        size = shape.get(self.family, (16, 3 * 2 * 4 * 4))  # Qwen: 16 flattened patches
        pixels = [torch.randn(*size, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        if self.family == "llava_onevision":  # a base view and one crop
            sizes = torch.tensor([[32, 32]] * len(prompts))
            return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pixels), "image_sizes": sizes}
        if self.family.startswith("qwen"):
            return {
                "input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels),
                "image_grid_thw": torch.tensor([[1, 4, 4]] * len(prompts)),
                "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
            }  # fmt: skip
        if self.family == "gemma3":  # its image tokens attend to each other both ways
            return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pixels),
                    "token_type_ids": (ids == IMAGE_TOKEN).int()}  # fmt: skip
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pixels)}


@pytest.fixture(params=list(VLM_FACTORIES))
def vlm_family(request):
    return request.param
