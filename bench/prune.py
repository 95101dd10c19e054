"""What pruning visual tokens saves: time per generated token, prefill time and KV-cache size at keep ratios
1, 0.5, 0.25 and 0.125, as ratios to the unpruned model, in one run (variants interleaved).

    python bench/prune.py                          # tiny-llava (random LLaVA), CPU
    python bench/prune.py --model smollm2-llava    # SmolLM2-135M behind a random CLIP: 256 image tokens
    python bench/prune.py --model /path/to/llava-1.5-7b-hf --device cuda --batch-size 8

Prefill and the greedy decoding steps after it are timed apart. Memory is the KV cache the prompt leaves
(exact), plus the peak allocated on CUDA.

With `--tasks`, each variant also answers the tasks' test items, pruned as ranked and, given `--trend`
(a config from `intervene calibrate --method prune`), pruned with the positional debiasing:

    python bench/prune.py --model /path/to/llava-1.5-7b-hf --tasks pope-photos,easy-vqa --trend calib/config.json
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from overhead import image_batch, prompts, smollm2_llava, timed

import intervene
from intervene.hooks.compat import cache_argument, output_cache

RATIOS = (1.0, 0.5, 0.25, 0.125)


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--image-size", type=int, default=224, help="smollm2-llava: 224 px = 256 tokens, 336 = 576")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", default=None, help="comma-separated image tasks scored under every variant")
    parser.add_argument("--trend", default=None, help="config.json of `intervene calibrate --method prune`")
    parser.add_argument("--limit", type=int, default=None, help="items per task")
    args = parser.parse_args()

    if args.model == "smollm2-llava":
        model, processor = smollm2_llava(args.device, args.image_size)
    else:
        model, processor = intervene.load_model(args.model, device=args.device)
    device = str(model.device)
    processor.tokenizer.padding_side = "left"
    batch = image_batch(processor, prompts(args.batch_size)).to(device)

    def prefill():
        with torch.no_grad():
            return model(**batch, use_cache=True)

    def decode(prefilled):
        """Greedy steps over the prompt's cache, as `generate` takes them (mask grown by one each step)."""
        token, mask = prefilled.logits[:, -1:].argmax(-1), batch["attention_mask"]
        cache = {cache_argument(model.forward): output_cache(prefilled)}
        with torch.no_grad():
            for _ in range(args.new_tokens):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                token = model(input_ids=token, attention_mask=mask, **cache, use_cache=True).logits
                token = token[:, -1:].argmax(-1)

    names = ["unpruned"] + [f"keep {ratio:g}" for ratio in RATIOS]
    times = {name: {"prefill": [], "decode": []} for name in names}
    memory = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, ratio in zip(names, (None, *RATIOS), strict=True):
            handle = None if ratio is None else intervene.apply(model, "prune", layer=args.layer, keep=ratio)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            box = {}
            seconds = timed(lambda box=box: box.update(out=prefill()), device)
            times[name]["prefill"].append(seconds)
            memory[name] = (cache_bytes(output_cache(box["out"])), 0)
            times[name]["decode"].append(timed(lambda box=box: decode(box["out"]), device) / args.new_tokens)
            if device.startswith("cuda"):
                memory[name] = (memory[name][0], torch.cuda.max_memory_allocated())
            if handle:
                handle.remove()
            if not repeat:
                for stage in times[name].values():
                    stage.pop()

    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum(1)[0])
    lengths = batch["attention_mask"].sum(-1)
    print(
        f"model {args.model} on {device}, {torch.get_num_threads()} threads; batch {args.batch_size}, prompt tokens "
        f"{int(lengths.min())}-{int(lengths.max())} ({image_tokens} image tokens each); pruned after layer "
        f"{args.layer - 1}; {args.new_tokens} new tokens; medians of {args.repeats}\n"
    )
    print("| variant | image tokens kept | ms / token | ratio | prefill ms | ratio | KV cache MiB | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for name, ratio in zip(names, (None, *RATIOS), strict=True):
        median = {stage: statistics.median(values) for stage, values in times[name].items()}
        row = (median["decode"], median["prefill"], memory[name][0])
        base = base or row
        kept = image_tokens if ratio is None else math.ceil(ratio * image_tokens)
        scales = (1e3, 1e3, 2**-20)  # ms, ms, MiB
        cells = " | ".join(f"{v * s:.1f} | {v / b:.2f}" for v, b, s in zip(row, base, scales, strict=True))
        print(f"| {name} | {kept} | {cells} |")
        if memory[name][1]:
            print(f"|   (peak CUDA memory {memory[name][1] / 2**20:.0f} MiB) | | | | | | | |")
    if args.tasks:
        accuracy(model, processor, args)


def accuracy(model, processor, args) -> None:
    """Each task's metrics under the unpruned model and each keep ratio, ranked raw and debiased."""
    from intervene.evals import scorers
    from intervene.evals.model import smoke_test_warning
    from intervene.evals.tasks import resolve_task

    if warning := smoke_test_warning(model):  # tiny-llava; smollm2-llava's vision tower is random too
        print(f"\n{warning}")
    elif args.model == "smollm2-llava":
        print("\nSMOKE TEST: smollm2-llava's vision tower has random weights; these numbers are not meaningful.")

    variants = {"unpruned": None}
    trend = intervene.load_config(args.trend).trend if args.trend else None
    for ratio in RATIOS[1:]:
        variants[f"keep {ratio:g}"] = {"keep": ratio}
        if trend is not None:
            variants[f"keep {ratio:g}, debiased"] = {"keep": ratio, "debias": "position", "trend": trend}
    print("\n| task | variant | " + " | ".join(["metric", "value", "delta"]) + " |\n|---|---|---|---:|---:|")
    for name in args.tasks.split(","):
        task = resolve_task(name.strip())
        items = task.items(task.split("test"), args.limit)
        base = None
        for variant, params in variants.items():
            handle = intervene.apply(model, "prune", layer=args.layer, **params) if params else None
            results = scorers.score(task, items, model, processor)
            if handle:
                handle.remove()
            keys = scorers.counts(task.output_type)
            sums = [sum(r[k] for r in results) for k in keys]
            metrics = {k: float(v) for k, v in scorers.corpus_metrics(task.output_type, sums, len(items)).items()}
            base = base or metrics
            for metric, value in metrics.items():
                print(f"| {task.name} | {variant} | {metric} | {value:.3f} | {value - base[metric]:+.3f} |")


if __name__ == "__main__":
    main()
