"""Real interruptions of a real `intervene eval` process: SIGKILL at a random point, then `--resume`, ends
with the results of an uninterrupted run; Ctrl-C (SIGINT) stops cleanly, keeping what was scored."""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

INTERVENE = Path(sys.executable).parent / "intervene"


def eval_args(checkpoint, output: Path) -> list[str]:
    return [str(INTERVENE), "eval", "--model", str(checkpoint), "--method", "act", "--param", "beta=0.3",
            "--tasks", "cldr_currency,mmlu_dev", "--limit", "16", "--batch-size", "2", "--device", "cpu",
            "--output-path", str(output)]  # fmt: skip


# Loaded by the eval's interpreter at start-up (sitecustomize): its scorer waits, at the call that begins the
# batch after PAUSE_AT scored variants, for the test's signal. A tiny model scores a batch in milliseconds, so a
# signal sent when the logs are seen to hold enough samples could land after the run has ended.
PAUSE = """
import os, time
from pathlib import Path
import intervene.evals.scorers as scorers

score, calls = scorers.score, [0]

def paused_score(*args, **kwargs):
    if calls[0] == int(os.environ["PAUSE_AT"]):
        Path(os.environ["PAUSED"]).touch()
        time.sleep(300)  # the signal arrives here
    calls[0] += 1
    return score(*args, **kwargs)

scorers.score = paused_score
"""


def start_and_stop(args, stop_signal, lines: int) -> tuple[subprocess.Popen, Path]:
    """Start an eval, let it log the batches that hold at least `lines` samples (each batch is scored twice,
    baseline and intervened), and send `stop_signal` as it begins the next batch."""
    batch = int(args[args.index("--batch-size") + 1])
    output = Path(args[args.index("--output-path") + 1])
    with tempfile.TemporaryDirectory() as hook:
        (Path(hook) / "sitecustomize.py").write_text(PAUSE)
        paused = Path(hook) / "paused"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([hook, os.environ.get("PYTHONPATH", "")]),
               "PAUSE_AT": str(2 * -(-lines // batch)), "PAUSED": str(paused)}  # fmt: skip
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's: not inherited SIG_IGN
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and not paused.exists():
            time.sleep(0.01)
        process.send_signal(stop_signal)
        process.wait(timeout=120)
    logged = sum(p.read_text().count("\n") for p in output.glob("*/samples_*.jsonl"))
    assert logged >= lines, f"stopped after {logged} samples, not {lines}"
    (run,) = output.iterdir()
    return process, run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint):
    output = tmp_path_factory.mktemp("whole")
    subprocess.run(eval_args(tiny_checkpoint, output), check=True, capture_output=True)
    (run,) = output.iterdir()
    return json.loads((run / "results.json").read_text())


@pytest.mark.parametrize("seed", [0, 1])
def test_a_killed_eval_resumes_to_the_same_results(tmp_path, tiny_checkpoint, uninterrupted, seed):
    lines = random.Random(seed).randrange(1, 30)  # of 32 samples: somewhere in the first or second task
    process, run = start_and_stop(eval_args(tiny_checkpoint, tmp_path), signal.SIGKILL, lines)
    assert process.returncode == -signal.SIGKILL, process.stdout.read()
    assert not (run / "results.json").exists()
    resumed = subprocess.run([*eval_args(tiny_checkpoint, tmp_path), "--resume", str(run)], capture_output=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((run / "results.json").read_text())["results"] == uninterrupted["results"]


def test_ctrl_c_stops_cleanly_with_the_scored_items_saved(tmp_path, tiny_checkpoint):
    process, run = start_and_stop(eval_args(tiny_checkpoint, tmp_path), signal.SIGINT, 6)
    said = process.stdout.read()
    assert process.returncode == 130 and "Traceback" not in said, said
    assert f"--resume {run}" in said and not (run / "results.json").exists()
    logged = [json.loads(line) for p in run.glob("samples_*.jsonl") for line in p.read_text().splitlines()]
    assert len(logged) >= 6 and all({"baseline", "intervened"} <= set(record) for record in logged)
    assert not list(run.glob("*.partial"))
    os.remove(run / "run.json")  # a folder without run.json is no run to resume
    result = subprocess.run([*eval_args(tiny_checkpoint, tmp_path), "--resume", str(run)], capture_output=True)
    assert result.returncode == 2 and b"no run.json" in result.stderr
