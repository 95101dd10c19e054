"""Time cost of interventions relative to the unwrapped model, measured in one run.

    python bench/overhead.py                       # the default model, CPU
    python bench/overhead.py --model /path/to/ckpt --device cuda --batch-size 16
    python bench/overhead.py --model tiny-llava    # a VLM: pai (and its contrast), var, vhr, vcd and causalmm
    python bench/overhead.py --model smollm2-llava # SmolLM2 behind a random CLIP: a real language model's cost
    python bench/overhead.py --random llama-3-8b --device cuda   # random weights in a real model's shape (GPU)

Variants run interleaved, repeat after repeat, on the same left-padded batch of prompts; the table
gives median times and their ratio to the unwrapped model (machines are noisy: compare ratios).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import intervene

SENTENCES = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She walked along the river until the lights of the town came into view.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "The library closes early on public holidays, so plan your visit accordingly.",
    "Mount Everest is the highest mountain above sea level on Earth.",
    "After the storm, volunteers cleared the fallen branches from the park paths.",
    "A prime number has exactly two distinct positive divisors.",
]

VARIANTS = {
    "unwrapped": None,
    "act (defaults)": ("act", {}),
    "zerotuning (gamma=2)": ("zerotuning", {"gamma": 2.0}),
}
VLM_VARIANTS = {
    "unwrapped": None,
    "pai (defaults)": ("pai", {}),
    "var (defaults)": ("var", {}),
    "vhr (defaults, + no-image branch)": ("vhr", {}),
    "pai + contrast (cfg_gamma=1.1, + no-image branch)": ("pai", {"cfg_gamma": 1.1}),
    "vcd (defaults, + distorted-image branch)": ("vcd", {}),
    "causalmm (defaults, + counterfactual branch)": ("causalmm", {}),
    "causalmm where=vision (+ counterfactual-features branch)": ("causalmm", {"where": "vision"}),
}
PHOTOS = Path(intervene.__file__).parent / "evals" / "data" / "pope-photos"
REAL_SHAPES = {  # Llama configs of real sizes, for `--random`: what a GPU's timings are about
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
}


def prompts(batch_size: int) -> list[str]:
    """Prompts of 2 to 2+batch_size sentences, so the batch is left-padded."""
    return [" ".join(SENTENCES[i % 8 : i % 8 + 2 + i] * 2) for i in range(batch_size)]


def smollm2_llava(device: str | None, image_size: int = 224):
    """A LLaVA whose language model is the default SmolLM2-135M, behind a random 4-layer CLIP (224 px: 256
    image tokens): VLM timings at a real language model's size. What it says about images means nothing."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from intervene.evals.model import TINY_LLAVA_TEMPLATE

    language_model, tokenizer = intervene.load_model("smollm2-135m")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    language_model.resize_token_embeddings(len(tokenizer))
    vision = CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        image_size=image_size, patch_size=14,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=language_model.config, image_token_id=len(tokenizer) - 1,
        image_seq_length=(image_size // 14) ** 2, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=TINY_LLAVA_TEMPLATE,
    )  # fmt: skip
    return model.eval().to(device or "cpu"), processor


def random_llama(shape: str, device: str | None, prompt_tokens: int, batch_size: int):
    """A Llama of a real model's shape with random weights (bf16 on a GPU), and a left-padded batch of random
    tokens from `prompt_tokens` down to 3/4 of it: timings of a real size, outputs that mean nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = device or "cpu"
    config = LlamaConfig(**REAL_SHAPES[shape], num_key_value_heads=8, vocab_size=128256, pad_token_id=0,
                         max_position_embeddings=2 * prompt_tokens + 1024)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device.startswith("cuda") else torch.float32).eval()
    lengths = [prompt_tokens - (prompt_tokens // 4) * i // max(batch_size - 1, 1) for i in range(batch_size)]
    ids = torch.randint(1, config.vocab_size, (batch_size, prompt_tokens))
    mask = torch.zeros(batch_size, prompt_tokens, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, prompt_tokens - length :] = 1
    return model, {"input_ids": ids * mask, "attention_mask": mask}


def image_batch(processor, texts: list[str]):
    """One bundled photo per prompt, with the prompt as a question about it, in the model's chat format."""
    from PIL import Image

    photos = sorted(PHOTOS.glob("*.jpg"))
    images = [Image.open(photos[i % len(photos)]).convert("RGB") for i in range(len(texts))]
    chats = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{text} Describe the image."}]}],
            add_generation_prompt=True,
        )
        for text in texts
    ]
    return processor(images=images, text=chats, return_tensors="pt", padding=True)


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--random", choices=list(REAL_SHAPES), help="random weights in this shape, instead of --model")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="with --random: the longest prompt")
    args = parser.parse_args()

    vision = False
    if args.random:
        model, batch = random_llama(args.random, args.device, args.prompt_tokens, args.batch_size)
        pad_token_id = 0
    else:
        if args.model == "smollm2-llava":
            model, processor = smollm2_llava(args.device)
        else:
            model, processor = intervene.load_model(args.model, device=args.device)
        vision = hasattr(processor, "image_processor")
        tokenizer = processor.tokenizer if vision else processor
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        texts = prompts(args.batch_size)
        batch = image_batch(processor, texts) if vision else tokenizer(texts, return_tensors="pt", padding=True)
        pad_token_id = tokenizer.pad_token_id
    device = str(model.device)
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    variants = VLM_VARIANTS if vision else VARIANTS

    def prefill():
        with torch.no_grad():
            model(**batch)

    def generate():
        with torch.no_grad():
            model.generate(
                **batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, pad_token_id=pad_token_id,
            )  # fmt: skip

    times = {name: {"prefill": [], "generate": []} for name in variants}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, variant in variants.items():
            handle = intervene.apply(model, variant[0], **variant[1]) if variant else None
            for stage, fn in (("prefill", prefill), ("generate", generate)):
                elapsed = timed(fn, device)
                if repeat:
                    times[name][stage].append(elapsed)
            if handle:
                handle.remove()

    lengths = batch["attention_mask"].sum(-1)
    print(
        f"model {args.random or args.model} on {device}, {torch.get_num_threads()} threads; batch {args.batch_size}, "
        f"prompt tokens "
        f"{int(lengths.min())}-{int(lengths.max())}; generate = prefill + {args.new_tokens} decode steps; "
        f"median of {args.repeats}\n"
    )
    print("| variant | prefill ms | ratio | generate ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    base = {stage: statistics.median(times["unwrapped"][stage]) for stage in ("prefill", "generate")}
    for name in variants:
        cells = []
        for stage in ("prefill", "generate"):
            median = statistics.median(times[name][stage])
            cells += [f"{median * 1e3:.0f}", f"{median / base[stage]:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
