"""Evaluation: models, tasks from local files, scorers and the paired before/after runner."""
