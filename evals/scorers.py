"""Scorers: turn a batch of items into one result per item, with the per-item metrics of its task.

- `multiple_choice`: log-likelihood of each choice after the query (`acc`; `acc_norm` divides by the
  choice's length in characters, delimiter left out, as lm-eval does; `entropy` of the distribution
  over the choices);
- `classification`: ACT-style, the argmax over the choices' label tokens at the last position, each
  label being the last token of " " + choice;
- `generate_until`: generation, cut at the stop strings, matched against the accepted answers;
  an item with no accepted answer expects an abstention ("I don't know"), and a confident answer that
  is not accepted is a hallucination;
- `pope`: generation of a short answer, read as yes/no by POPE's rule (below); `acc`,
  `precision`, `recall`, `f1` (of "yes") and `yes_ratio` over the whole set;
- `chair`: generation of a caption; `chair_s` (share of captions naming an object not in the
  image), `chair_i` (share of object mentions that are hallucinated), `recall` (share of the images'
  objects that the captions name) and `length` (words per caption).

Generation is greedy unless the task samples (its `generation_kwargs`, read as lm-eval reads them: `do_sample`,
`temperature`, `top_p`, `top_k`); then a batch draws from torch's generator, which the runner seeds for each batch
(`batch_seed`), the same in both passes. Batches are left-padded and positions skip the padding. Items with an
image go through the model's processor and its chat template (a user turn holding the image and the query); the
model must be a vision-language one. Every metric is a ratio of sums of per-item counts (`COUNTS`), so the runner can
resample items and recompute a corpus-level metric such as F1 exactly.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from . import chair
from .tasks import METRICS, SAMPLING, TaskError  # METRICS: what each scorer computes (a task reports or lists them)

# The per-item numbers whose sums over the items give the metrics (see `corpus_metrics`); for the other
# output types each metric is the mean of its per-item value.
COUNTS = {
    "pope": ("acc", "tp", "pred_yes", "label_yes"),
    "chair": ("chair_s", "n_hallucinated", "n_mentioned", "n_covered", "n_objects", "length"),
}
# Metrics that are means of a per-item 0/1 outcome, for which McNemar's test applies.
PAIRED_BINARY = {"pope": ("acc",), "chair": ("chair_s",)}
ABSTAIN = re.compile(
    r"\b(i don't know|i do not know|don't know|not sure|unknown|no such country|does not exist|"
    r"doesn't exist|not a real|fictional|no official language|cannot answer|can't answer)\b"
)


def score(task, items, model, processor) -> list[dict]:
    """Per-item results; `processor` is the model's tokenizer, or its processor for a vision-language model."""
    if task.needs_images:
        if getattr(processor, "image_processor", None) is None:
            raise TaskError(
                f"task {task.name!r} needs images, but the model's {type(processor).__name__} reads text only"
            )
        return SCORERS[task.output_type](task, items, model, processor)
    return SCORERS[task.output_type](task, items, model, getattr(processor, "tokenizer", processor))


def counts(output_type: str) -> tuple[str, ...]:
    return COUNTS.get(output_type, METRICS[output_type])


def corpus_metrics(output_type: str, sums: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Each metric from the sums of the per-item `counts(output_type)` over n items; `sums` is [..., counts]
    (a leading axis holds bootstrap resamples). A ratio with nothing to divide by is 0."""
    s = dict(zip(counts(output_type), np.moveaxis(np.asarray(sums, dtype=float), -1, 0), strict=True))
    if output_type == "pope":
        return {
            "acc": s["acc"] / n,
            "precision": _ratio(s["tp"], s["pred_yes"]),
            "recall": _ratio(s["tp"], s["label_yes"]),
            "f1": _ratio(2 * s["tp"], s["pred_yes"] + s["label_yes"]),  # 2PR/(P+R) = 2TP/(2TP+FP+FN)
            "yes_ratio": s["pred_yes"] / n,
        }
    if output_type == "chair":
        return {
            "chair_s": s["chair_s"] / n,
            "chair_i": _ratio(s["n_hallucinated"], s["n_mentioned"]),
            "recall": _ratio(s["n_covered"], s["n_objects"]),
            "length": s["length"] / n,
        }
    return {name: s[name] / n for name in METRICS[output_type]}


def _ratio(numerator, denominator):
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def multiple_choice(task, items, model, tokenizer) -> list[dict]:
    pairs = [
        _encode_pair(tokenizer, item.query, task.target_delimiter + choice) for item in items for choice in item.choices
    ]
    keep = max(len(continuation) for _, continuation in pairs)
    # lm-eval's input: the continuation's last token predicts nothing, so it is left out, and an intervention that
    # reads the whole call (ACT's sink detection) sees what it sees under lm-eval
    logits = _last_logits(model, tokenizer, [(context + continuation)[:-1] for context, continuation in pairs], keep)
    logprobs = logits.log_softmax(dim=-1)  # [pairs, keep, V]
    totals = []
    for row, (_, tokens) in enumerate(pairs):
        positions = torch.arange(keep - len(tokens), keep)  # the logits that predict the continuation
        totals.append(logprobs[row, positions, tokens].sum().item())
    results, start = [], 0
    for item in items:
        loglik = totals[start : start + len(item.choices)]
        start += len(item.choices)
        normalised = [ll / len(c) for ll, c in zip(loglik, item.choices, strict=True)]  # lm-eval: characters
        pred, pred_norm = _argmax(loglik), _argmax(normalised)
        results.append(
            {
                "loglikelihoods": loglik,
                "pred": pred,
                "pred_norm": pred_norm,
                "acc": float(pred == item.gold),
                "acc_norm": float(pred_norm == item.gold),
                "entropy": _entropy(loglik),
            }
        )
    return results


def classification(task, items, model, tokenizer) -> list[dict]:
    logits = _last_logits(model, tokenizer, [_encode(tokenizer, item.query, special=True) for item in items], 1)
    logprobs = logits[:, -1].log_softmax(dim=-1)  # [B, V]
    results = []
    for row, item in enumerate(items):
        labels = [_encode(tokenizer, task.target_delimiter + choice)[-1] for choice in item.choices]
        scores = logprobs[row, labels].tolist()
        pred = _argmax(scores)
        results.append(
            {"label_logprobs": scores, "pred": pred, "acc": float(pred == item.gold), "entropy": _entropy(scores)}
        )
    return results


def generate_until(task, items, model, processor) -> list[dict]:
    settings = task.generation()
    results = []
    for text, item in zip(_generate(items, model, processor, **_decoding(settings)), items, strict=True):
        output = cut(text, settings["until"]).strip()
        abstained = bool(ABSTAIN.search(output.lower().replace("’", "'")))
        said = output.lower()
        correct = abstained if not item.answers else not abstained and any(a.lower() in said for a in item.answers)
        results.append(
            {
                "output": output,
                "acc": float(correct),
                "hallucination": float(not abstained and not correct),
                "abstention": float(abstained),
            }
        )
    return results


def pope_answer(output: str) -> str:
    """POPE's reading of an answer: its first sentence (up to the first "."), commas dropped, split on
    spaces; "no", "No" or "not" among the words means no, anything else yes (POPE's and LLaVA's rule)."""
    words = output.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def pope(task, items, model, processor) -> list[dict]:
    settings = task.generation()  # by default 8 new tokens: an answer is one word or a short sentence
    results = []
    for output, item in zip(_generate(items, model, processor, **_decoding(settings)), items, strict=True):
        output = cut(output, settings["until"]).strip()
        said_yes, is_yes = pope_answer(output) == "yes", item.gold == 1
        results.append(
            {
                "output": output,
                "answer": "yes" if said_yes else "no",
                "acc": float(said_yes == is_yes),
                "tp": float(said_yes and is_yes),
                "pred_yes": float(said_yes),
                "label_yes": float(is_yes),
            }
        )
    return results


def chair_captions(task, items, model, processor) -> list[dict]:
    settings = task.generation()
    vocab = chair.vocabulary(task.coco_synonyms or chair.SYNONYMS)
    outputs = [cut(output, settings["until"]) for output in _generate(items, model, processor, **_decoding(settings))]
    return [
        {"output": output.strip(), **chair.score(output, set(item.objects), vocab)}
        for output, item in zip(outputs, items, strict=True)
    ]


def cut(text: str, stops: list[str]) -> str:
    """The text up to the first of the stop strings, as lm-eval cuts a generation (an empty stop cuts nothing)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


SCORERS = {
    "multiple_choice": multiple_choice,
    "classification": classification,
    "generate_until": generate_until,
    "pope": pope,
    "chair": chair_captions,
}


def batch_seed(seed: int, batch: int) -> int:
    """The seed of torch's generator before batch number `batch` of a run seeded `seed` is scored: both passes of a
    paired run sample that batch from the same numbers, whichever process scores it, resumed or not."""
    return seed * 1_000_003 + batch


def _decoding(settings: dict) -> dict:
    """`_generate`'s keywords for a task's generation settings (`Task.generation`)."""
    decoding = {"max_new_tokens": settings["max_gen_toks"]}
    if settings["do_sample"]:
        decoding["sampling"] = {name: settings[name] for name in SAMPLING if name in settings}
    return decoding


def _generate(items, model, processor, max_new_tokens: int, sampling: dict | None = None) -> list[str]:
    """Continuations of a left-padded batch, decoded without special tokens: greedy, or sampled with `sampling`
    (some of temperature, top_p, top_k; the model's defaults for the others) from torch's global generator, which
    the callers seed."""
    if items[0].image is None:
        ids, mask = _left_pad([_encode(processor, item.query, special=True) for item in items], _pad_id(processor))
        inputs = {"input_ids": ids, "attention_mask": mask}
        tokenizer = processor
    else:
        inputs = _image_inputs(items, processor, model.dtype)
        tokenizer = processor.tokenizer
    _check_context(model, inputs["attention_mask"].sum(dim=1), max_new_tokens)
    with torch.no_grad():
        out = model.generate(
            **{k: v.to(input_device(model)) for k, v in inputs.items()},
            max_new_tokens=max_new_tokens,
            do_sample=sampling is not None,
            **(sampling or {}),
            pad_token_id=_pad_id(tokenizer),
        )
    width = inputs["input_ids"].shape[1]
    return [tokenizer.decode(row[width:], skip_special_tokens=True).lstrip() for row in out]


def _image_inputs(items, processor, dtype) -> dict:
    from PIL import Image

    images = []
    for item in items:
        if isinstance(item.image, Image.Image):  # opened already: lmms-eval's doc_to_visual gives images
            images.append(item.image.convert("RGB"))
            continue
        try:
            with Image.open(item.image) as image:
                images.append(image.convert("RGB"))
        except OSError as error:
            raise TaskError(f"image {item.image} cannot be read ({error})") from None
    prompts = [prompt_text(processor, item.query) for item in items]
    inputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return dict(inputs)


def prompt_text(processor, query: str) -> str:
    """The processor's chat template around one user turn (image, then query); without a template, the
    image placeholder on a line before the query."""
    if getattr(processor, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query}]}]
        return processor.apply_chat_template(turn, add_generation_prompt=True)
    return f"{processor.image_token}\n{query}"


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special).input_ids


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The tokens of a context and of its continuation as lm-eval splits them: the context's trailing spaces
    move to the continuation, the two are encoded as one text, and the continuation is what follows the
    context's own tokens (an empty context is the BOS, or EOS, token alone)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        head, tokens = [prefix], _encode(tokenizer, continuation)
    else:
        head = _encode(tokenizer, context, special=True)
        tokens = _encode(tokenizer, context + continuation, special=True)[len(head) :]
    if not tokens:
        raise TaskError(f"the choice {continuation!r} after {context[-40:]!r} is no token at all; give it some text")
    return head, tokens


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def _last_logits(model, tokenizer, sequences: list[list[int]], keep: int) -> torch.Tensor:
    """fp32 logits of the last `keep` positions of each left-padded sequence: [B, keep, V]."""
    ids, mask = _left_pad(sequences, _pad_id(tokenizer))
    _check_context(model, mask.sum(dim=1), 0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    device = input_device(model)
    with torch.no_grad():
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
            use_cache=False,
        )
    return out.logits.float().cpu()


def input_device(model) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (for a model spread over devices by a
    device map, `model.device` may name another one)."""
    return model.get_input_embeddings().weight.device


def _check_context(model, lengths: torch.Tensor, new_tokens: int) -> None:
    """Refuse prompts (plus the tokens to generate) longer than the model's context, rather than let
    positions run past what it was trained on."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = int(lengths.max())
    if context is not None and longest + new_tokens > context:
        raise TaskError(
            f"a prompt of {longest} tokens (+{new_tokens} to generate) is longer than the model's context of "
            f"{context} tokens; shorten the task's prompts (or --limit them away) or use a longer-context model"
        )


def _entropy(scores: list[float]) -> float:
    """Entropy (nats) of the model's distribution over the choices: needs no label."""
    logp = torch.tensor(scores).log_softmax(dim=0)
    return float(-(logp.exp() * logp).sum())


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
