"""The Triton kernels compile for real GPUs, and fit them, on a machine without one.

The rest of the suite runs the kernels in Triton's CPU interpreter, which accepts code the GPU compiler
rejects (an `if` whose branches give different shapes) and knows nothing of registers or shared memory.
`bench/kernel_resources.py` compiles every launch path as the launchers launch it, for sm_90 (H100) and
sm_80 (A100), against a stand-in driver, in a process without TRITON_INTERPRET."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
PATHS = 26  # (stage, edit, kernel) per target and head size, each compiled for every tile autotuning may pick


def test_every_kernel_path_compiles_for_hopper_and_ampere_within_their_shared_memory():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--arch", "90,80", "--head-dim", "96,256"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    for arch in (90, 80):
        for head_dim in (96, 256):
            ours = [row for row in rows if row["arch"] == arch and row["head_dim"] == head_dim]
            assert len({(row["stage"], row["edit"], row["kernel"]) for row in ours}) == PATHS, (arch, head_dim, ours)
            assert {row["kernel"] for row in ours} == {"_forward", "_decode_split", "_statistics", "_column_sums"}
            for row in ours:
                assert row["shared_kib"] <= row["shared_limit_kib"], row  # more would not launch
                assert row["registers"] <= 255, row
