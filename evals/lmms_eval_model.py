"""`intervene` as an lmms-eval model: lmms-eval's image tasks (POPE and the like) on an intervened vision-language
model.

    lmms-eval --model intervene --model_args pretrained=tiny-llava,method=pai,alpha=0.5 --tasks pope ...

An installed intervene registers the class through the entry point `lmms_eval.models` (pyproject.toml), which is how
lmms-eval 0.7 finds third-party models; importing this module registers it as well. `model_args` takes `pretrained`
(a built-in name, a local checkpoint directory or a hub id of a vision-language model), `dtype`, and the
intervention: `method` with its parameters (`method=var,p_move=0.6`), or `config=saved.json` (parameters given
beside it override the file's). With neither, the model runs unedited, as a baseline.

Requests are batched `batch_size` at a time, left-padded with their attention mask by the model's processor, each
prompt its chat template around one user turn (the image, then lmms-eval's text), as `intervene eval` builds them;
generation is greedy. So an item's answer does not depend on the batch it fell in, also under an intervention that
reads the whole call (VAR finds sinks per row, PAI edits each row's last query). A document gives one image. Tasks
that score log-likelihoods (a few of lmms-eval's, such as seedbench_ppl) are refused: most of its tasks generate.

lmms-eval 0.7.3 does not ask its model for a description (the call is commented out in its `simple_evaluate`), so
its results record the intervention as it was given, in `config.model_args`; `get_model_info()` holds the
resolved one (every parameter, the model it was resolved for), and the run's log prints it.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from .. import apply, load_config
from .model import is_vision_language, load_model, smoke_test_warning
from .scorers import _generate, cut

# Settings of lmms-eval's `generation_kwargs` that greedy decoding ignores.
NO_EFFECT_WHEN_GREEDY = ("top_p", "top_k")


class InterveneLMM(lmms):
    """An `intervene.load_model` vision-language model for lmms-eval, with an intervention applied to it."""

    def __init__(
        self,
        pretrained: str = "tiny-llava",
        method: str | None = None,
        config: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        **params,
    ):
        super().__init__()
        if params and method is None and config is None:
            raise ValueError(
                f"model_args {', '.join(sorted(params))} are not options of the intervene model; its options are "
                "pretrained, method, config, dtype, device, batch_size, and the parameters of a method or config"
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"the intervene model takes a number from 1 up as batch_size, not {batch_size!r}")
        if not is_vision_language(pretrained):
            raise ValueError(
                f"{pretrained} is a language model; the intervene lmms-eval model runs vision-language models: "
                "evaluate it with lm-eval (`intervene lm-eval --model intervene ...`) or `intervene eval`"
            )
        self.model, self.processor = load_model(pretrained, dtype=dtype, device=device)
        self.pretrained_name = pretrained
        self.batch_size = int(batch_size)
        self.intervention = None
        if method is not None:
            self.intervention = apply(self.model, method, config=config, **params)
        elif config is not None:
            self.intervention = apply(self.model, load_config(config), **params)
        if (note := smoke_test_warning(self.model)) is not None:
            logger.warning(note)
        logger.info(f"intervene: {json.dumps(self.get_model_info()['intervention'])}")

    def get_model_info(self) -> dict:
        """The model and the resolved intervention, as the lm-eval model records them in lm-eval's results."""
        return {
            "model_name_or_path": self.pretrained_name,
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(self.model.dtype),
            "intervention": None if self.intervention is None else self.intervention.to_dict(),
        }

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, in the order of the requests; requests with the same generation settings share batches."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        answers: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="intervene generating") as progress:
            for indices in groups.values():
                max_new_tokens, until = _greedy_settings(requests[indices[0]].args[1])
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    items = [self._item(requests[index]) for index in chunk]
                    texts = _generate(items, self.model, self.processor, max_new_tokens)
                    for index, text in zip(chunk, texts, strict=True):
                        answers[index] = cut(text, until)
                    progress.update(len(chunk))
        return answers

    def _item(self, request) -> SimpleNamespace:
        """The request's text and its one image, as the scorers' batching takes them."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            raise ValueError(
                f"task {task!r} document {doc_id} gives {len(visuals)} visuals "
                f"({', '.join(type(v).__name__ for v in visuals)}); the intervene model takes one image per document"
            )
        return SimpleNamespace(query=context, image=visuals[0])

    def loglikelihood(self, requests):
        raise NotImplementedError(
            f"task {requests[0].task_name!r} scores log-likelihoods; the intervene lmms-eval model generates "
            "(generate_until tasks such as pope): score multiple-choice tasks with `intervene eval`"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            f"task {requests[0].task_name!r} generates over several rounds; the intervene lmms-eval model answers "
            "one round (generate_until tasks such as pope)"
        )


def _greedy_settings(generation_kwargs: dict) -> tuple[int, list[str]]:
    """`(max_new_tokens, stop strings)` of a task's `generation_kwargs`; sampling, beams and settings this model
    would not honour are refused by name rather than dropped."""
    settings = dict(generation_kwargs)
    until = settings.pop("until", [])
    max_new_tokens = settings.pop("max_new_tokens", 1024)  # lmms-eval's llava_hf default
    sample = settings.pop("do_sample", False)
    temperature = settings.pop("temperature", 0)
    beams = settings.pop("num_beams", 1)
    if sample or (temperature or 0) > 0 or (beams or 1) != 1:
        raise ValueError(
            f"generation_kwargs do_sample={sample}, temperature={temperature}, num_beams={beams}: the intervene model "
            "decodes greedily; set do_sample: false, temperature: 0, num_beams: 1 (in the task or with --gen_kwargs)"
        )
    for name in NO_EFFECT_WHEN_GREEDY:
        settings.pop(name, None)
    if settings:
        raise ValueError(
            f"generation_kwargs {', '.join(sorted(settings))} are not honoured by the intervene model, which takes "
            "until, max_new_tokens and the greedy settings do_sample, temperature, num_beams, "
            + ", ".join(NO_EFFECT_WHEN_GREEDY)
        )
    return int(max_new_tokens), [until] if isinstance(until, str) else list(until)


def manifest():
    """The class's entry in lmms-eval's model registry; the entry point `lmms_eval.models` names this function."""
    from lmms_eval.models.registry_v2 import ModelManifest  # imports lmms_eval.models: not while this module loads

    return ModelManifest(model_id="intervene", simple_class_path=f"{__name__}.{InterveneLMM.__name__}")


def _register() -> None:
    """Register the class in lmms-eval's model registry, building the registry if need be. While lmms-eval builds it,
    it imports this module through the entry point and calls `manifest` itself: there is no registry to add to yet."""
    from lmms_eval import models

    registry = getattr(models, "MODEL_REGISTRY_V2", None)
    if registry is not None:
        registry.register_manifest(manifest(), overwrite=True)


_register()
