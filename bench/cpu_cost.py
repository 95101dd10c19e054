"""What an intervention costs a prefill, relative to the unwrapped model, measured in one run.

    python bench/cpu_cost.py                          # the default model, 300 tokens x 8 and 2k tokens x 1
    python bench/cpu_cost.py --lengths 300,1000,4000 --batch-sizes 8,1,1 --repeats 7
    python bench/cpu_cost.py --model smollm2-llava    # PAI and VAR: SmolLM2 behind a random CLIP, a photo a prompt
    python bench/cpu_cost.py --task mmlu_dev          # also an eval task's scoring, in seconds per item

For each prompt length, the variants run interleaved, round after round, on the same left-padded batch of real
text; the first round warms up and is dropped. The table gives the median milliseconds of one forward and its
ratio to the unwrapped model's median (machines are noisy: compare ratios, taken in one run). The shipped
configs are those `intervene eval --method <m>` uses for the model. With `--task`, each variant also scores the
built-in task's test items batch by batch as `intervene eval` batches them (longest first, 16 a batch), the variants
interleaved on each batch after one batch of warm-up: seconds per item and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import intervene

CONFIGS = Path(intervene.__file__).parent / "configs"
TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. Water boils at one hundred degrees "
    "Celsius at sea level. She walked along the river until the lights of the town came into view. "
    "Photosynthesis converts light energy into chemical energy stored in sugars. "
)


def variants(model_name: str) -> dict:
    """name -> (method or config, params); None: the unwrapped model."""
    if model_name == "smollm2-llava":
        return {"unwrapped": None, "pai (defaults)": ("pai", {}), "var (defaults)": ("var", {})}
    shipped = {
        f"{method} (shipped config)": (intervene.load_config(CONFIGS / model_name / method / "config.json"), {})
        for method in ("zerotuning", "act")
        if (CONFIGS / model_name / method / "config.json").is_file()
    }
    return {
        "unwrapped": None,
        **shipped,
        "zerotuning (gamma=2, every head)": ("zerotuning", {"gamma": 2.0}),
        "act (every head of layers 2..L-2)": ("act", {}),
    }


def batch_of(tokenizer, length: int, size: int) -> dict:
    """`size` prompts of `length` tokens down to 3/4 of it, left-padded: a batch with padding."""
    ids = tokenizer(TEXT * (length // 40 + 1), return_tensors="pt").input_ids[0]
    rows = [ids[: length - (length // 4) * i // max(size - 1, 1)] for i in range(size)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((size, width), tokenizer.pad_token_id or 0)
    mask = torch.zeros(size, width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return {"input_ids": input_ids, "attention_mask": mask}


def image_batch_of(processor, length: int, size: int) -> dict:
    """`size` prompts of a photo (256 tokens) and text, `length` tokens down to 3/4 of it, left-padded."""
    from overhead import image_batch

    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    ids = tokenizer(TEXT * (length // 40 + 1)).input_ids
    texts = [tokenizer.decode(ids[: max(8, length - 300 - (length // 4) * i // max(size - 1, 1))]) for i in range(size)]
    return dict(image_batch(processor, texts))


def task_cost(model, tokenizer, chosen: dict, task_name: str, batch_size: int = 16) -> dict[str, float]:
    """Seconds per item of each variant scoring the task's test items, batch by batch, interleaved."""
    from intervene.evals import scorers, tasks

    task = tasks.resolve_task(task_name)
    items = task.items("test")
    order = sorted(items, key=lambda item: -len(item.query))  # as `intervene eval` batches them
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    seconds = dict.fromkeys(chosen, 0.0)
    for number, batch in enumerate([batches[0], *batches]):  # the first round warms up
        for name, variant in chosen.items():
            handle = intervene.apply(model, variant[0], **variant[1]) if variant else None
            began = time.perf_counter()
            scorers.score(task, batch, model, tokenizer)
            elapsed = time.perf_counter() - began
            if handle:
                handle.remove()
            seconds[name] += elapsed if number else 0.0
    return {name: spent / len(items) for name, spent in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="300,2000", help="prompt lengths in tokens")
    parser.add_argument("--batch-sizes", default="8,1", help="a batch size for each length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--task", help="a built-in text task (e.g. mmlu_dev) whose scoring is timed too")
    args = parser.parse_args()
    if args.task and args.model == "smollm2-llava":
        parser.error("--task times a text model's scoring; smollm2-llava's variants need images")

    if args.model == "smollm2-llava":
        from overhead import smollm2_llava

        model, processor = smollm2_llava("cpu")
        batch_of_length = lambda length, size: image_batch_of(processor, length, size)
    else:
        model, tokenizer = intervene.load_model(args.model, device="cpu")
        batch_of_length = lambda length, size: batch_of(tokenizer, length, size)
    lengths = [int(n) for n in args.lengths.split(",") if n]  # none: only --task
    sizes = [int(n) for n in args.batch_sizes.split(",") if n]
    chosen = variants(args.model)
    print(f"model {args.model}, CPU, {torch.get_num_threads()} threads; median of {args.repeats} forwards\n")
    print("| tokens x batch | " + " | ".join(chosen) + " |")
    print("|---|" + "---:|" * len(chosen))
    for length, size in zip(lengths, sizes, strict=True):
        batch = batch_of_length(length, size)
        times = {name: [] for name in chosen}
        for repeat in range(args.repeats + 1):
            for name, variant in chosen.items():
                handle = intervene.apply(model, variant[0], **variant[1]) if variant else None
                with torch.no_grad():
                    began = time.perf_counter()
                    model(**batch)
                    elapsed = time.perf_counter() - began
                if handle:
                    handle.remove()
                if repeat:
                    times[name].append(elapsed)
        base = statistics.median(times["unwrapped"])
        cells = [f"{statistics.median(times[name]) * 1e3:.0f} ms ({statistics.median(times[name]) / base:.2f}x)"
                 for name in chosen]  # fmt: skip
        tokens = batch["attention_mask"].sum(-1)
        print(f"| {int(tokens.max())} x {size} (shortest {int(tokens.min())}) | " + " | ".join(cells) + " |")
    if args.task:
        per_item = task_cost(model, tokenizer, chosen, args.task)
        cells = [f"{per_item[name]:.3f} s ({per_item[name] / per_item['unwrapped']:.2f}x)" for name in chosen]
        print(f"| {args.task}, s/item | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
