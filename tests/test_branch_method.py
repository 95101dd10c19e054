"""A method that needs a second branch of the model, written in this one file with no change to the hooks: it
runs the prompt again without its first token, with its own cache, and averages the two branches' logits
(through the language model's output hidden states: they come after the final norm, and the output layer is
linear, so their average gives the average of the logits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import intervene
from intervene.interventions import Forward, Method

from conftest import build, prompt


@dataclass
class Branch:
    cache: Any = None  # the branch's own KV cache
    length: int = 0  # tokens it holds
    hidden: torch.Tensor | None = None  # [B, N, hidden] its output hidden states of the latest forward


@dataclass(frozen=True)
class WithoutFirstToken(Method):
    """Average the logits with those of the same sequence without its first token (batch 1)."""

    State = Branch

    def active_layers(self) -> frozenset[int]:
        return frozenset()  # no attention edit: the method acts on the output

    def start(self, forward: Forward, branch: Branch) -> None:
        ids = forward.input_ids[:, 1:] if forward.prefill else forward.input_ids  # [1, N]
        total = branch.length + ids.shape[1]
        branch.hidden, branch.cache = forward.run_branch(
            input_ids=ids,
            attention_mask=torch.ones(1, total, dtype=torch.long),
            position_ids=torch.arange(branch.length, total)[None],
            cache=branch.cache,
        )
        branch.length = total

    def output(self, forward: Forward, hidden: torch.Tensor, branch: Branch) -> torch.Tensor:
        shared = branch.hidden.shape[1]  # the main pass's last `shared` tokens are the branch's tokens
        return torch.cat([hidden[:, :-shared], (hidden[:, -shared:] + branch.hidden) / 2], dim=1)


def test_a_second_branch_is_one_file_of_method_hooks():
    model = build("llama")
    ids = torch.tensor([prompt(9, 3)])
    with torch.no_grad():
        plain = model(ids).logits  # [1, 9, V]
        without_first = model(ids[:, 1:]).logits  # [1, 8, V]
        with intervene.apply(model, WithoutFirstToken()):
            averaged = model(ids).logits
            generated = model.generate(
                ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        after = model(ids).logits
    torch.testing.assert_close(averaged[:, 0], plain[:, 0], atol=0, rtol=0)  # no branch token to average with
    torch.testing.assert_close(averaged[:, 1:], (plain[:, 1:] + without_first) / 2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(averaged[:, 1:], plain[:, 1:], atol=1e-3)  # the branch changed them
    assert torch.equal(after, plain)  # removed: the model is as before

    # Each cached decoding step: the average of the two sequences' next-token logits, each run whole.
    sequence = generated.sequences[0]
    for step, logits in enumerate(generated.logits):
        seen = sequence[None, : ids.shape[1] + step]
        with torch.no_grad():
            expected = (model(seen).logits[:, -1] + model(seen[:, 1:]).logits[:, -1]) / 2
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert int(sequence[ids.shape[1] + step]) == int(expected.argmax())
