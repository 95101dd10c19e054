"""Scorers: turn a batch of items into one result per item, with the per-item metrics of its task.

- `multiple_choice`: log-likelihood of each choice after the query (`acc`; `acc_norm` divides by the
  choice's length in bytes, as lm-eval does; `entropy` of the distribution over the choices);
- `classification`: ACT-style, the argmax over the choices' label tokens at the last position, each
  label being the last token of " " + choice;
- `generate_until`: greedy generation, cut at the stop strings, matched against the accepted answers;
  an item with no accepted answer expects an abstention ("I don't know"), and a confident answer that
  is not accepted is a hallucination.

Batches are left-padded and positions skip the padding.
"""

from __future__ import annotations

import re

import torch

METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "classification": ("acc",),
    "generate_until": ("acc", "hallucination", "abstention"),
}
ABSTAIN = re.compile(
    r"\b(i don't know|i do not know|don't know|not sure|unknown|no such country|does not exist|"
    r"doesn't exist|not a real|fictional|no official language|cannot answer|can't answer)\b"
)


def score(task, items, model, tokenizer) -> list[dict]:
    return SCORERS[task.output_type](task, items, model, tokenizer)


def multiple_choice(task, items, model, tokenizer) -> list[dict]:
    pairs = [(item.query, task.target_delimiter + choice) for item in items for choice in item.choices]
    contexts = [_encode(tokenizer, context, special=True) for context, _ in pairs]
    continuations = [_encode(tokenizer, continuation) for _, continuation in pairs]
    keep = max(map(len, continuations)) + 1
    logits = _last_logits(model, tokenizer, [c + t for c, t in zip(contexts, continuations, strict=True)], keep)
    logprobs = logits.log_softmax(dim=-1)  # [pairs, keep, V]
    totals = []
    for row, tokens in enumerate(continuations):
        positions = torch.arange(keep - len(tokens) - 1, keep - 1)  # the logits that predict the continuation
        totals.append(logprobs[row, positions, tokens].sum().item())
    results, start = [], 0
    for item in items:
        loglik = totals[start : start + len(item.choices)]
        start += len(item.choices)
        normalised = [
            ll / len((task.target_delimiter + c).encode()) for ll, c in zip(loglik, item.choices, strict=True)
        ]
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


def generate_until(task, items, model, tokenizer) -> list[dict]:
    settings = {"max_new_tokens": 32, "until": ["\n"], **task.generation_kwargs}
    ids, mask = _left_pad([_encode(tokenizer, item.query, special=True) for item in items], _pad_id(tokenizer))
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=settings["max_new_tokens"],
            do_sample=False,
            pad_token_id=_pad_id(tokenizer),
        )
    results = []
    for row, item in enumerate(items):
        text = tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True).lstrip()
        for stop in settings["until"]:
            text = text.split(stop)[0]
        output = text.strip()
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


SCORERS = {
    "multiple_choice": multiple_choice,
    "classification": classification,
    "generate_until": generate_until,
}


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special).input_ids


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
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            position_ids=positions.to(model.device),
            logits_to_keep=keep,
            use_cache=False,
        )
    return out.logits.float().cpu()


def _entropy(scores: list[float]) -> float:
    """Entropy (nats) of the model's distribution over the choices: needs no label."""
    logp = torch.tensor(scores).log_softmax(dim=0)
    return float(-(logp.exp() * logp).sum())


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
