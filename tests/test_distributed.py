"""Scale-out of `intervene eval`: processes started by `accelerate launch` share the batches and end with the
results and per-sample logs of one process; a run of 2 processes that is interrupted resumes in 1; and
`--device-map auto` changes nothing. CPU only (the processes talk over gloo), no network."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from intervene.cli import app

# multiple choice, classification and generation; 5 items in batches of 2 make 3 batches a task, so with
# 2 processes rank 0 scores two of them and rank 1 one
EVAL = ["eval", "--method", "act", "--tasks", "cldr_currency,mmlu_dev,unanswerable_qa", "--limit", "5"]
EVAL += ["--batch-size", "2", "--device", "cpu"]

# Replaces `-m intervene.cli` in a launch: rank 1 is interrupted (Ctrl-C) at its 3rd scorer call, the
# first of the second task, and the launcher then stops rank 0 wherever it is.
INTERRUPTED = """
import os
from intervene.cli import main
from intervene.evals import scorers

score, calls = scorers.score, []

def interrupted(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise KeyboardInterrupt
    return score(*args, **kwargs)

scorers.score = interrupted
main()
"""


def launch(processes: int, home: Path, *args, program=("-m", "intervene.cli")) -> subprocess.CompletedProcess:
    """`accelerate launch` with every setting given, so that no accelerate config on this machine is read.
    `--cpu` starts one process (more only under MPI), so several are started by `--multi_gpu` (torchrun),
    which intervene runs on the CPU when told `--device cpu`. Every process gets one thread, the same
    in both runs compared (see the README on threads)."""
    mode = ["--cpu"] if processes == 1 else ["--multi_gpu", "--main_process_port", "0"]  # 0: a free port
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *program]
    env = {**os.environ, "HF_HOME": str(home / "hf_home"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=180)


def run_of(output: Path) -> tuple[dict, dict[str, str], Path]:
    """The results document of the one run in `output`, its log files by name, and its folder."""
    (run,) = output.iterdir()
    samples = {path.name: path.read_text() for path in sorted(run.glob("samples_*"))}
    return json.loads((run / "results.json").read_text()), samples, run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_checkpoint):
    output = tmp_path_factory.mktemp("one-process")
    result = launch(1, output, *EVAL, "--model", tiny_checkpoint, "--output-path", output / "runs")
    assert result.returncode == 0, result.stderr
    return run_of(output / "runs")


def test_two_processes_end_with_the_results_and_logs_of_one(tmp_path, tiny_checkpoint, one_process):
    result = launch(2, tmp_path, *EVAL, "--model", tiny_checkpoint, "--output-path", tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    document, samples, _ = run_of(tmp_path / "runs")
    one, one_samples, _ = one_process
    assert document["config"]["processes"] == 2 and one["config"]["processes"] == 1
    assert document["results"] == one["results"]
    assert samples == one_samples  # byte for byte, in batch order, and no rank's log left over
    assert result.stdout.count("| cldr_currency | acc |") == 1  # rank 0 alone reports


def test_a_run_of_two_processes_interrupted_resumes_in_one(tmp_path, tiny_checkpoint, one_process):
    (tmp_path / "interrupted.py").write_text(INTERRUPTED)
    args = [*EVAL, "--model", tiny_checkpoint]
    result = launch(2, tmp_path, *args, "--output-path", tmp_path / "runs", program=[tmp_path / "interrupted.py"])
    assert result.returncode != 0 and "--resume" in result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert not (run / "results.json").exists()
    assert (run / "samples_cldr_currency.jsonl").read_text() == one_process[1]["samples_cldr_currency.jsonl"]
    assert (run / "samples_mmlu_dev.rank1.jsonl").exists()  # the interrupted task's logs stay apart
    with open(run / "samples_mmlu_dev.rank0.jsonl", "a") as log:
        log.write('{"task": "mmlu_dev", "ind')  # a line cut short by the kill

    result = launch(1, tmp_path, *args, "--resume", run)
    assert result.returncode == 0, result.stderr
    document, samples, _ = run_of(tmp_path / "runs")
    assert document["results"] == one_process[0]["results"]
    assert samples == one_process[1]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_device_map_auto_gives_the_same_results(tmp_path, tiny_checkpoint):
    args = [*EVAL[:-2], "--model", tiny_checkpoint]  # EVAL less --device
    assert invoke(*args, "--output-path", tmp_path / "placed").exit_code == 0
    result = invoke(*args, "--device-map", "auto", "--output-path", tmp_path / "mapped")
    assert result.exit_code == 0, result.output
    (placed, placed_samples, _), (mapped, mapped_samples, _) = run_of(tmp_path / "placed"), run_of(tmp_path / "mapped")
    assert mapped["config"]["device_map"] == "auto" and placed["config"]["device_map"] is None
    assert mapped["results"] == placed["results"] and mapped_samples == placed_samples


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "cpu", "--device-map", "auto"], "give --device or --device-map, not both"),
        (["--device-map", "everywhere"], "device map 'everywhere' is not one of auto, balanced, balanced_low_0"),
    ],
)
def test_a_bad_device_map_is_refused(tmp_path, tiny_checkpoint, extra, message):
    result = invoke(*EVAL[:-2], "--model", tiny_checkpoint, *extra, "--output-path", tmp_path)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_calibrate_refuses_several_processes(tmp_path, tiny_checkpoint, monkeypatch):
    from types import SimpleNamespace

    from intervene.evals import runner

    monkeypatch.setattr(runner, "processes", lambda device=None: SimpleNamespace(num_processes=2))
    result = invoke("calibrate", "--method", "act", "--model", tiny_checkpoint, "--tasks", "cldr_currency",
                    "--output-path", tmp_path)  # fmt: skip
    assert result.exit_code == 2 and "calibrate runs in one process" in result.output
