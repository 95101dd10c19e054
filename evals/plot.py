"""`intervene eval --plot`: the results as a picture, one row per task.

Left, each metric before and after; right, the paired change with its bootstrap 95% CI as whiskers and a
line at zero, so a change the items support is one whose whiskers do not cross the line.
"""

from __future__ import annotations

from pathlib import Path

from .inspect import require_matplotlib


def plot_results(results: dict, path: Path, title: str = "") -> None:
    """Write `results[task][metric]` (baseline, intervened, delta, ci95, n) to the PNG at `path`."""
    plt = require_matplotlib()
    figure = results_figure(plt, results, title)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def results_figure(plt, results: dict, title: str = ""):
    """The matplotlib figure: per task, the scores (left) and the changes with CI whiskers (right)."""
    tasks = list(results)
    height = 0.6 + sum(max(1.6, 0.5 * len(results[task]) + 0.9) for task in tasks)  # inches: title, then tasks
    figure, axes = plt.subplots(
        len(tasks), 2, figsize=(10, height), squeeze=False, layout="constrained",
        height_ratios=[len(results[task]) for task in tasks],
    )  # fmt: skip
    for row, task in enumerate(tasks):
        metrics = results[task]
        names = list(metrics)
        places = list(range(len(names)))[::-1]  # the first metric on top
        scores, changes = axes[row]
        for offset, variant, colour in ((0.18, "baseline", "tab:gray"), (-0.18, "intervened", "tab:blue")):
            values = [metrics[name][variant] for name in names]
            scores.barh([p + offset for p in places], values, height=0.34, color=colour, label=variant)
        scores.set_yticks(places, names)
        scores.set_title(f"{task} (n = {metrics[names[0]]['n']})", fontsize=10, loc="left")
        for place, name in zip(places, names, strict=True):
            m = metrics[name]
            low, high = m["ci95"]
            supported = low > 0 or high < 0
            # a bootstrap percentile CI of a ratio metric need not contain the delta: no whisker on that side
            whiskers = [[max(0.0, m["delta"] - low)], [max(0.0, high - m["delta"])]]
            changes.errorbar(
                m["delta"], place, xerr=whiskers, fmt="o", capsize=4,
                color="tab:red" if supported else "black",
            )  # fmt: skip
        changes.axvline(0.0, color="gray", linewidth=1)
        changes.set_yticks(places, names)
        changes.set_ylim(-0.6, len(names) - 0.4)
        changes.set_title("intervened - baseline, 95% CI (red: excludes 0)", fontsize=10, loc="left")
    figure.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside upper right", ncols=2, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure
