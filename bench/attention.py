"""Attention providers on the same tensors, in one process: time, TFLOP/s, peak memory, ratio to SDPA-flash.

    python bench/attention.py                                   # GPU: bf16, hd 128, causal, N = 4k..32k
    python bench/attention.py --lengths 4096 --batch 4 --kv-heads 8
    TRITON_INTERPRET=1 python bench/attention.py --device cpu --lengths 64 --heads 4 --kv-heads 2 --head-dim 16
                                                                # a smoke run of the script itself, on CPU

Providers: ours plain and with each edit (key bias, PAI key gain, redistribution = statistics pass + biased
pass, head scale, column statistics); SDPA flash and, for the bias, SDPA efficient with a materialised
float mask; compiled FlexAttention with the same bias as a `score_mod`; and the research code's eager way
(materialise the probabilities, then edit them), up to where it runs out of memory. Prefill and decode
(one query row over an N-token cache). Rows print as a markdown table and as CSV (`--csv FILE` appends).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

import torch
import torch.nn.functional as F

from intervene import kernels
from intervene.kernels import AttentionEdit, KeyGain, Redistribute


def timed(fn, device: str, repeats: int) -> tuple[float, int]:
    """Median seconds and peak bytes allocated (CUDA) of `fn`."""
    if device == "cuda":
        import triton.testing

        torch.cuda.reset_peak_memory_stats()
        ms = triton.testing.do_bench(fn, warmup=5, rep=max(25, repeats * 10), return_mode="median")
        return ms / 1e3, torch.cuda.max_memory_allocated()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), 0


def providers(q, k, v, backend: str):
    B, Hq, Nq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bias = torch.randn(B, Hq, 1, N, device=q.device)
    sinks = torch.zeros(B, 1, N, dtype=torch.bool, device=q.device)
    sinks[:, :, :4] = True
    image = torch.zeros_like(sinks)
    image[:, :, N // 8 : N // 8 + N // 4] = True  # a quarter of the keys, like an image span
    edits = {
        "ours plain": AttentionEdit(),
        "ours + key bias": AttentionEdit(key_bias=bias),
        "ours + key gain (PAI)": AttentionEdit(key_gain=KeyGain(image[:, 0], 0.2)),
        "ours + redistribution": AttentionEdit(redistribute=Redistribute(sinks, image, 0.4)),
        "ours + head scale": AttentionEdit(head_scale=torch.full((1, Hq), 2.0, device=q.device)),
    }
    run = {name: (lambda e=e: kernels.modified_attention(q, k, v, e, backend=backend)) for name, e in edits.items()}
    run["ours column statistics"] = lambda: kernels.column_stats(q, k, backend=backend)
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kk, vv = (k, v) if G == 1 else (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))  # outside the timing

        def sdpa(which, mask=None):
            def call():
                with sdpa_kernel(which):
                    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=mask is None and Nq > 1)

            return call

        run["SDPA flash (plain)"] = sdpa(SDPBackend.FLASH_ATTENTION)
        if Nq * N <= 1 << 28:  # the materialised bias mask alone is Nq x N floats per head
            causal = torch.ones(Nq, N, dtype=torch.bool, device=q.device).tril(diagonal=N - Nq)
            mask = (bias.expand(B, Hq, Nq, N)).masked_fill(~causal, float("-inf")).to(q.dtype)
            run["SDPA efficient + bias mask"] = sdpa(SDPBackend.EFFICIENT_ATTENTION, mask)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention)
            blocks = create_block_mask(
                lambda b, h, qi, ki: ki <= qi + (N - Nq), B=None, H=None, Q_LEN=Nq, KV_LEN=N, device=q.device
            )
            run["flex (compiled) + key bias"] = lambda: flex(
                q, k, v, score_mod=lambda s, b, h, qi, ki: s + bias[b, h, 0, ki], block_mask=blocks, enable_gqa=G > 1
            )
        except Exception as error:  # flex is optional: report why it is missing rather than stop
            print(f"flex attention skipped: {error}")
    if Nq * N * Hq * B * 4 <= (1 << 33):  # eager materialises fp32 probabilities: stop before 8 GiB

        def eager():  # the research code: probabilities in memory, then edited (here: sinks scaled, renormalised)
            kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            scores = (q @ kk.transpose(-1, -2)).float() * D**-0.5
            causal = torch.ones(Nq, N, dtype=torch.bool, device=q.device).tril(diagonal=N - Nq)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            probs[..., :4] *= 0.4
            probs = probs / probs.sum(-1, keepdim=True)
            return probs.to(q.dtype) @ vv

        run["eager, materialise then edit"] = eager
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default=None, help="append one CSV row per case to this file")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    backend = "triton"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"{name}; torch {torch.__version__}; {args.dtype}, B {args.batch}, Hq {args.heads}, Hkv {args.kv_heads}, "
          f"D {args.head_dim}, causal; medians\n")  # fmt: skip
    print("| N | stage | provider | ms | TFLOP/s | peak MiB | vs SDPA flash | vs ours plain |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for n in map(int, args.lengths.split(",")):
        for stage, nq in (("prefill", n), ("decode", 1)):
            g = torch.Generator(device=device).manual_seed(0)
            shape = (args.batch, args.heads, nq, args.head_dim)
            q = torch.randn(*shape, generator=g, device=device, dtype=dtype)
            kv_shape = (args.batch, args.kv_heads, n, args.head_dim)
            k, v = (torch.randn(*kv_shape, generator=g, device=device, dtype=dtype) for _ in range(2))
            flops = 4 * args.batch * args.heads * nq * n * args.head_dim * (0.5 if nq > 1 else 1.0)
            results = {}
            for provider, fn in providers(q, k, v, backend).items():
                try:
                    results[provider] = timed(fn, device, args.repeats)
                except torch.OutOfMemoryError:
                    results[provider] = (float("nan"), -1)
                    torch.cuda.empty_cache()
            flash = results.get("SDPA flash (plain)", (float("nan"), 0))[0]
            plain = results["ours plain"][0]
            for provider, (seconds, peak) in results.items():
                row = {
                    "gpu": name, "n": n, "stage": stage, "provider": provider, "ms": seconds * 1e3,
                    "tflops": flops / seconds / 1e12, "peak_mib": peak / 2**20,
                    "vs_flash": seconds / flash, "vs_plain": seconds / plain, "dtype": args.dtype,
                    "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }  # fmt: skip
                rows.append(row)
                memory = "OOM" if peak < 0 else f"{row['peak_mib']:.0f}"
                print(f"| {n} | {stage} | {provider} | {row['ms']:.3f} | {row['tflops']:.1f} | {memory} | "
                      f"{row['vs_flash']:.2f} | {row['vs_plain']:.2f} |")  # fmt: skip
    if args.csv:
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
