"""What a run reports: the lm-eval-shaped results document and the markdown table, written atomically."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader never sees it half written (a crash leaves the old file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def versions() -> dict:
    import torch
    import transformers

    import intervene

    return {
        "intervene": intervene.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def markdown(results: dict, timing: dict, warning: str | None = None) -> str:
    """The results table; a `warning` (e.g. a model with random weights) is printed above it in bold."""
    lines = [f"**{warning}**", ""] if warning else []
    lines += [
        "| task | metric | n | baseline | intervened | delta | 95% CI | McNemar p | s/item before → after |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for task, metrics in results.items():
        t = timing[task]
        speed = f"{t['baseline_s_per_item']:.3f} → {t['intervened_s_per_item']:.3f}"
        for name, m in metrics.items():
            runs = f" ({len(m['seeds'])} seeds)" if "seeds" in m else ""
            lines.append(
                f"| {task}{runs} | {name} | {m['n']} | {m['baseline']:.4f} | {m['intervened']:.4f} | {m['delta']:+.4f} "
                f"| [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}] | {_p(m['p_value'])} | {speed} |"
            )
    return "\n".join(lines)


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"
