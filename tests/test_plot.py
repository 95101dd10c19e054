"""`intervene eval --plot`: the picture shows the numbers of the results document, whiskers at the CI."""

import sys

import numpy as np
import pytest
from PIL import Image

from intervene.evals.inspect import require_matplotlib
from intervene.evals.plot import plot_results, results_figure


def metric(before, after, low, high, n=50):
    return {"baseline": before, "intervened": after, "delta": after - before, "ci95": [low, high], "p_value": None,
            "n": n}  # fmt: skip


RESULTS = {
    "facts": {"acc": metric(0.6, 0.7, 0.02, 0.18), "acc_norm": metric(0.5, 0.45, -0.12, 0.03)},
    "pope": {"f1": metric(0.8, 0.78, -0.05, 0.01), "yes_ratio": metric(0.6, 0.5, -0.15, -0.05)},
    "mmlu": {"acc": metric(0.25, 0.25, -0.02, 0.02)},
}


def test_the_figure_draws_the_scores_and_the_ci_whiskers():
    plt = require_matplotlib()
    figure = results_figure(plt, RESULTS)
    axes = np.array(figure.axes).reshape(len(RESULTS), 2)
    for (scores, changes), (task, metrics) in zip(axes, RESULTS.items(), strict=True):
        names = list(metrics)
        bars = sorted(scores.patches, key=lambda bar: -bar.get_y())  # top to bottom: metric by metric
        drawn = [bar.get_width() for bar in bars]
        assert drawn == pytest.approx([metrics[n][v] for n in names for v in ("baseline", "intervened")])
        whiskers = [c for c in changes.collections if c.get_segments()]  # one error bar per metric
        for line, name in zip(whiskers, names, strict=True):
            (segment,) = line.get_segments()
            assert sorted(segment[:, 0]) == pytest.approx(metrics[name]["ci95"])
            low, high = metrics[name]["ci95"]
            red = tuple(line.get_color()[0][:3]) == pytest.approx((0.839, 0.153, 0.157), abs=1e-3)  # tab:red
            assert red == (low > 0 or high < 0)  # red exactly when the CI leaves out zero
        assert task in scores.get_title(loc="left")
    plt.close(figure)


def test_a_delta_outside_its_ci_is_drawn_with_the_whisker_to_the_far_end(tmp_path):
    # a percentile CI of a ratio (precision, CHAIR_I) need not contain the delta; a negative whisker once crashed
    results = {"pope": {"precision": metric(0.5, 0.4, -0.05, 0.02), "recall": metric(0.5, 0.6, 0.12, 0.3)}}
    plt = require_matplotlib()
    figure = results_figure(plt, results)
    changes = figure.axes[1]
    segments = [line.get_segments()[0] for line in changes.collections if line.get_segments()]
    ends = [end for segment in segments for end in sorted(segment[:, 0])]
    assert ends == pytest.approx([-0.1, 0.02, 0.1, 0.3])  # from the delta to the CI's far end
    plt.close(figure)
    plot_results(results, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0


def test_plot_results_writes_a_png(tmp_path):
    plot_results(RESULTS, tmp_path / "results.png", title="model · method")
    with Image.open(tmp_path / "results.png") as picture:
        assert picture.format == "PNG" and picture.height > 300


def test_eval_plot_writes_the_picture_beside_the_results(tmp_path, tiny_checkpoint):
    from typer.testing import CliRunner

    from intervene.cli import app

    args = ["eval", "--model", str(tiny_checkpoint), "--method", "act", "--tasks", "cldr_currency,mmlu_dev",
            "--limit", "4", "--output-path", str(tmp_path), "--plot"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.iterdir()
    with Image.open(run / "results.png") as picture:
        assert picture.height > 300
    assert f"plot: {run / 'results.png'}" in result.output


def test_eval_plot_without_matplotlib_fails_before_the_model_loads(tmp_path, tiny_checkpoint, monkeypatch):
    from typer.testing import CliRunner

    import intervene
    from intervene.cli import app

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    monkeypatch.setattr(intervene, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    args = ["eval", "--model", str(tiny_checkpoint), "--method", "act", "--tasks", "cldr_currency",
            "--output-path", str(tmp_path), "--plot"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "pip install 'intervene[plot]'" in result.output
    assert not list(tmp_path.iterdir())
