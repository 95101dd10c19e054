"""What the Triton kernels cost an NVIDIA GPU, found on a machine without one: each kernel is compiled as its
launcher would launch it (same specialisation, blocks and warps) for sm_90 (H100) and sm_80 (A100), and
ptxas's resource report gives its registers per thread, register spills and shared memory.

    python bench/kernel_resources.py                          # sm_90 and sm_80; head dims 64, 128, 256
    python bench/kernel_resources.py --arch 90 --head-dim 128

Nothing runs: the launches stop after compiling (Triton's warmup), against a stand-in for the CUDA driver
that names the target. A kernel that spills registers goes through local memory on every tile; one that
needs more shared memory than the GPU has does not launch. Triton's CPU interpreter, which the tests use,
sees neither, nor a kernel that does not compile at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels for a GPU")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner

SHARED_LIMIT_KIB = {90: 227, 80: 163}  # the most one block may opt into: H100, A100
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class TargetOnly:
    """The part of Triton's CUDA driver that compiling asks for: a device, a stream and the target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch  # Triton caches compiled kernels per device: one "device" per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True

    def get_benchmarker(self):  # Triton 3.2's autotuner asks for it when a kernel is decorated
        return None


triton.runtime.driver.set_active(TargetOnly(90))  # before the kernels are decorated (see get_benchmarker)
from intervene.kernels import AttentionEdit, Counterfactual, KeyGain, Redistribute, fused  # noqa: E402


class CompileOnly:
    """While active: every kernel launch compiles for `arch` and is recorded instead of running, an autotuned one
    for each tile its pruning keeps. The stand-in driver stays afterwards (there is no real one to go back to:
    this process never runs a kernel)."""

    def __init__(self, arch: int):
        self.arch, self.kernels = arch, []

    def __enter__(self):
        self.run, self.tune = triton.runtime.jit.JITFunction.run, Autotuner.run
        triton.runtime.driver.set_active(TargetOnly(self.arch))
        kernels, run = self.kernels, self.run

        def compile_only(jit, *args, grid, warmup, **kwargs):
            tile = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}, {kwargs.get('num_warps', 4)} warps"
            if "num_stages" in kwargs:
                tile += f", {kwargs['num_stages']} stages"
            kernels.append((jit.__name__, tile, run(jit, *args, grid=grid, warmup=True, **kwargs)))

        def compile_each_tile(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
            for config in tuner.prune_configs(kwargs):
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())

        triton.runtime.jit.JITFunction.run = compile_only
        Autotuner.run = compile_each_tile
        return self

    def __exit__(self, *exc):
        triton.runtime.jit.JITFunction.run, Autotuner.run = self.run, self.tune


def resources(kernel) -> dict:
    """Registers per thread, spilled bytes per thread and shared memory (KiB) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        report = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    line = next(line for line in report.stdout.splitlines() if "REG:" in line)  # REG:179 STACK:0 SHARED:...
    fields = dict(field.split(":", 1) for field in line.split() if ":" in field)
    shared_kib = kernel.metadata.shared / 1024
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["STACK"]), "shared_kib": shared_kib}


def launches(head_dim: int, n: int = 4096, heads: int = 32, kv_heads: int = 8):
    """(stage, edit, call) for every kernel path the launchers take, on bf16 tensors of the benchmark's shape."""
    q = torch.randn(1, heads, n, head_dim, dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, n, head_dim, dtype=torch.bfloat16)
    sinks = torch.zeros(1, 1, n, dtype=torch.bool)
    sinks[..., :4] = True
    image = torch.zeros_like(sinks)
    image[..., n // 8 : n // 8 + n // 4] = True
    padding = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
    padding[..., :3] = False
    edits = {
        "plain": AttentionEdit(),
        "key bias per key": AttentionEdit(key_bias=torch.randn(1, heads, 1, n)),
        "key bias per row": AttentionEdit(key_bias=torch.randn(1, 1, n, n)),
        "key gain (PAI)": AttentionEdit(key_gain=KeyGain(image[:, 0], 0.2)),
        "redistribution": AttentionEdit(redistribute=Redistribute(sinks, image, 0.4)),
        "head scale": AttentionEdit(head_scale=torch.full((1, heads), 2.0)),
        "counterfactual uniform (CausalMM)": AttentionEdit(counterfactual=Counterfactual("uniform")),
        "counterfactual reverse (CausalMM)": AttentionEdit(counterfactual=Counterfactual("reverse")),
        "learned sinks and soft-capping (the model's)": AttentionEdit(),
    }
    for name, edit in edits.items():
        model = {"sinks": None, "softcap": None}
        if name.startswith("learned sinks"):
            model = {"sinks": torch.zeros(1, heads), "softcap": 50.0}  # as the launchers get them: [1, Hq] fp32
        for stage, rows in (("prefill", q), ("decode", q[:, :, -1:])):
            if stage == "decode" and name == "key bias per row":
                continue
            masks = {"": None, " + padding mask": padding[:, :, -rows.shape[2] :]} if name == "plain" else {"": None}
            for suffix, mask in masks.items():
                call = lambda rows=rows, edit=edit, mask=mask, model=model: fused.attention(
                    rows, k, k, edit, attention_mask=mask, scale=head_dim**-0.5, causal=mask is None, return_lse=True,
                    **model,
                )  # fmt: skip
                yield stage, name + suffix, call
    no_edit = {"attention_mask": None, "query_mask": None, "key_bias": None, "sinks": None, "softcap": None}
    yield "prefill", "column statistics", lambda: fused.column_stats(q, k, scale=head_dim**-0.5, causal=True, **no_edit)
    yield (
        "prefill",
        "column statistics + padding mask",
        lambda: fused.column_stats(q, k, scale=head_dim**-0.5, causal=True, **{**no_edit, "attention_mask": padding}),
    )
    act = lambda: fused.column_stats_and_rows(  # the pass with the likely sinks hidden, then column sums from its LSE
        q,
        k,
        k,
        sinks[:, 0],
        heads=torch.arange(heads // 4),
        attention_mask=None,
        scale=head_dim**-0.5,
        causal=True,
        query_mask=None,
    )
    yield "prefill", "column statistics and their row pass", act


def report(arch: int, head_dim: int) -> list[dict]:
    """One row per kernel compiled on every launch path."""
    rows = []
    for stage, edit, call in launches(head_dim):
        with CompileOnly(arch) as compiled:
            call()
        for kernel_name, tile, kernel in compiled.kernels:
            rows.append({"arch": arch, "head_dim": head_dim, "stage": stage, "edit": edit, "kernel": kernel_name,
                         "tile": tile, **resources(kernel),
                         "shared_limit_kib": SHARED_LIMIT_KIB.get(arch)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--head-dim", default="64,128,256")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead of the table")
    args = parser.parse_args()
    if not args.json:
        print(f"triton {triton.__version__}; bf16, Hq 32, Hkv 8, N 4096 (decode: 1 row); per thread\n")
        print("| sm | D | stage | edit | kernel | tile | registers | spilled bytes | shared KiB |")
        print("|---|---:|---|---|---|---|---:|---:|---:|")
    for arch in map(int, args.arch.split(",")):
        for head_dim in map(int, args.head_dim.split(",")):
            for row in report(arch, head_dim):
                if args.json:
                    print(json.dumps(row))
                    continue
                over = " (over the limit)" if row["shared_kib"] > (row["shared_limit_kib"] or float("inf")) else ""
                print(f"| {arch} | {head_dim} | {row['stage']} | {row['edit']} | {row['kernel']} | {row['tile']} "
                      f"| {row['registers']} "
                      f"| {row['spill_bytes']} | {row['shared_kib']:.0f}{over} |")  # fmt: skip


if __name__ == "__main__":
    main()
