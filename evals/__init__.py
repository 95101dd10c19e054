"""Evaluation: models, tasks from local files and from lm-eval, scorers, and the paired before/after runner behind
one entry point, `run(EvalSpec(...))` (see `evaluator`)."""

from .evaluator import EvalSpec, Interrupted, run

__all__ = ["EvalSpec", "Interrupted", "run"]
