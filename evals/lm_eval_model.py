"""`intervene` as an lm-eval model: lm-eval's tasks, prompts and metrics on an intervened model.

    import intervene.evals.lm_eval_model  # registers the model class under the name "intervene"
    lm_eval.simple_evaluate(model="intervene", model_args="pretrained=smollm2-135m,method=act,beta=0.4", ...)

`model_args` takes `pretrained` (a built-in name, a local checkpoint directory or a hub id), `dtype`,
`add_bos_token`, and the intervention: `method` with its parameters (`method=zerotuning,gamma=2`), or
`config=saved.json` (a file `Intervention.save` or `intervene calibrate` wrote). With neither, the model
runs unedited, as a baseline.

lm-eval's own HF model right-pads a batch of log-likelihood requests and calls the model without an
attention mask. Causal attention keeps the pads out of the real rows, but not out of an intervention that
reads the whole call: ACT counts the pads among the queries when it finds sinks, so an item's score would
depend on its batch. This class computes each batch left-padded, with the mask and the position ids that
skip the padding, so every row is computed as it would be alone. The input of a request is lm-eval's:
context and continuation without the continuation's last token, which is all that ACT's sink detection
sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .. import apply, load_config
from .model import is_vision_language, load_model
from .scorers import _left_pad


@register_model("intervene")
class InterveneLM(HFLM):
    """lm-eval's HF model on an `intervene.load_model` model, with an intervention applied to it."""

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        method: str | None = None,
        config: str | None = None,
        dtype: str | None = None,
        add_bos_token: bool = False,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int = 64,
        max_length: int | None = None,
        **params,
    ):
        if params and method is None and config is None:
            raise ValueError(
                f"model_args {', '.join(sorted(params))} are not options of the intervene model; its options are "
                "pretrained, method, config, dtype, add_bos_token, max_length, and the parameters of a method or config"
            )
        if is_vision_language(pretrained):
            raise ValueError(
                f"{pretrained} is a vision-language model; the intervene lm-eval model runs language models "
                "(lmms-eval is not supported yet): evaluate it with `intervene eval` and its image tasks"
            )
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            device = None  # lm-eval's command line defaults to cuda:0; like its own HF model, use what there is
        model, tokenizer = load_model(pretrained, dtype=dtype, device=device, add_bos_token=add_bos_token)
        # add_bos_token=None leaves BOS to the tokenizer's default, as lm-eval's hf model and intervene eval do
        super().__init__(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=max_batch_size,
            max_length=max_length, add_bos_token=add_bos_token or None,
        )  # fmt: skip
        self.pretrained_name = pretrained
        self.intervention = None
        if method is not None:  # parameters override those of `config`, if one is given
            self.intervention = apply(model, method, config=config, **params)
        elif config is not None:
            self.intervention = apply(model, load_config(config), **params)

    def get_model_info(self) -> dict:
        """What lm-eval records of the model, with the resolved intervention (nothing is looked up on the hub)."""
        return {
            "model_name_or_path": self.pretrained_name,
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(self.model.dtype),
            "intervention": None if self.intervention is None else self.intervention.to_dict(),
        }

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """`(log-likelihood, is greedy)` of each `(cache key, context tokens, continuation tokens)`, each row
        computed left-padded, with its mask, as it would be alone (see the module's docstring)."""
        if self.batch_size == "auto" and override_bs is None:
            raise ValueError("the intervene model takes a number as batch_size, not 'auto'")
        size = override_bs or self.batch_size
        # Longest first, as lm-eval orders them: a batch's rows are of similar length, so little is padded.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            ids, mask = _left_pad([(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in chunk], 0)
            width = ids.shape[1]
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                ).logits  # fmt: skip
            log_probs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)  # [B, width, V]
            for row, index in enumerate(chunk):
                key, _, continuation = requests[index]
                target = torch.tensor(continuation, device=log_probs.device)  # [C]
                scored = log_probs[row, width - len(continuation) :]  # [C, V]: the rows predicting it
                answer = (
                    float(scored.gather(-1, target[:, None]).sum()),
                    bool((scored.argmax(-1) == target).all()),
                )
                results[index] = answer
                if key is not None:  # None: a rolling window, cached per document by lm-eval itself
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results
