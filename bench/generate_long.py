"""Time per generated token of a tiny-width, long-context Llama: `act` through our kernels vs plain SDPA.

    python bench/generate_long.py                          # GPU: bf16, prompt 16k, 64 new tokens
    python bench/generate_long.py --prompt 32768 --layers 8
    python bench/generate_long.py --device cpu --dtype float32 --prompt 512 --new-tokens 8   # smoke run

The model is random (a config, no weights): what is measured is attention at length, where the research
code's eager attention runs out of memory. Prefill and decode are timed apart; variants interleave.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import intervene
from intervene.hooks.compat import cache_argument, output_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=args.prompt + 1024,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype)).eval()
    ids = torch.randint(3, 1024, (1, args.prompt), device=args.device)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def run() -> tuple[float, float]:
        with torch.no_grad():
            sync()
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            sync()
            prefill = time.perf_counter() - start
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                out = model(input_ids=token, **{cache_argument(model.forward): cache}, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            sync()
            return prefill, (time.perf_counter() - start) / args.new_tokens

    variants = {
        "sdpa (plain)": None,
        "act via intervene": ("act", {}),
        "zerotuning via intervene": ("zerotuning", {"gamma": 2.0}),
    }
    times = {name: ([], []) for name in variants}
    for repeat in range(args.repeats + 1):  # the first round warms up (and compiles) and is dropped
        for name, variant in variants.items():
            handle = intervene.apply(model, variant[0], **variant[1]) if variant else None
            prefill, per_token = run()
            if handle:
                handle.remove()
            if repeat:
                times[name][0].append(prefill)
                times[name][1].append(per_token)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device}; {args.dtype}; Llama {args.layers} layers x 4 heads (2 KV), hd 64; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens; medians of {args.repeats}\n")  # fmt: skip
    print("| variant | prefill ms | ratio | ms / token | ratio |")
    print("|---|---:|---:|---:|---:|")
    base = [statistics.median(t) for t in times["sdpa (plain)"]]
    for name, (prefill, per_token) in times.items():
        p, t = statistics.median(prefill), statistics.median(per_token)
        print(f"| {name} | {p * 1e3:.1f} | {p / base[0]:.2f} | {t * 1e3:.2f} | {t / base[1]:.2f} |")


if __name__ == "__main__":
    main()
