"""benchmarks/training_report.py: the campaign log as a table, a JSON budget and a curve figure."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
import training_report  # benchmarks/, on sys.path through conftest.py

from scripts import visualize

LOG = """iteration,epoch,wall_s,images_seen,val_dice,val_ssim,val_psnr,validation
100,1,60.0,800,0.30,0.50,15.0,set a
200,2,130.0,1600,0.40,0.60,16.0,set a
300,3,200.0,2400,0.35,0.65,17.0,set a
"""


def test_report_writes_the_budget_and_the_curve(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text(LOG)
    output, figure = tmp_path / "training.json", tmp_path / "curve.png"
    summary = training_report.main(["--log", str(log), "--output", str(output), "--figure", str(figure)])
    assert summary["steps"] == 300 and summary["images_seen"] == 2400 and summary["epochs"] == 3
    assert summary["wall_hours"] == pytest.approx(200 / 3600, abs=0.01)
    assert summary["best_val_dice"] == {"steps": 200, "value": 0.40}
    assert json.loads(output.read_text())["last"]["val_ssim"] == pytest.approx(0.65)
    assert figure.stat().st_size > 10_000, "a rendered figure, not an empty file"
    assert "0.400" in capsys.readouterr().out


def test_report_says_one_line_when_the_log_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="training log not found"):
        training_report.main(["--log", str(tmp_path / "absent.csv")])


def test_report_marks_recipe_changes_and_refuses_a_malformed_marker(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(LOG)
    output, figure = tmp_path / "training.json", tmp_path / "curve.png"
    argv = ["--log", str(log), "--output", str(output), "--figure", str(figure), "--marker", "150:decay starts"]
    summary = training_report.main(argv)
    assert summary["recipe_changes"] == [{"step": 150, "change": "decay starts"}]
    assert "--marker '150:decay starts'" in json.loads(output.read_text())["command"]
    assert figure.stat().st_size > 10_000
    with pytest.raises(SystemExit):  # argparse: one line naming the expected form
        training_report.main([*argv[:-1], "decay starts"])


def test_curve_labels_only_the_hours_the_log_covers(tmp_path, monkeypatch):
    """A resumed campaign's log starts hours in: the top axis must not stack ticks for hours before its first row."""
    figures = []
    monkeypatch.setattr(visualize, "_save_figure", lambda fig, path, title="", bottom=0.0: figures.append(fig))
    rows = [
        {"iteration": step, "wall_s": 1440.0 + 1.6 * step, "val_dice": 0.3 + step * 1e-5} for step in (330, 2000, 8250)
    ]
    visualize.save_training_curve(rows, tmp_path / "curve.png")
    (axis,) = figures[0].axes[0].child_axes
    ticks = axis.get_xticks()
    first, last = rows[0]["wall_s"] / 3600, rows[-1]["wall_s"] / 3600
    assert len(ticks) >= 2 and all(first <= t <= last for t in ticks), ticks
    plt.close(figures[0])


def test_the_marker_legend_sits_under_the_panels_without_covering_them(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(
        visualize, "_save_figure", lambda fig, path, title="", bottom=0.0: figures.append((fig, bottom))
    )
    rows = [{"iteration": step, "wall_s": 2.0 * step, "val_dice": 0.3 + step * 1e-5} for step in (330, 2000, 8250)]
    markers = {500: "decay starts", 4000: "tissue loss", 6000: "rate at 1e-5", 7000: "fourth"}
    visualize.save_training_curve(rows, tmp_path / "curve.png", metrics=("val_dice", "val_ssim"), markers=markers)
    fig, bottom = figures[0]
    assert [text.get_text() for text in fig.legends[0].get_texts()] == list(markers.values())
    assert all(ax.get_legend() is None for ax in fig.axes), "no legend inside a panel"
    fig.tight_layout(rect=(0.0, bottom, 1.0, 1.0))  # what _save_figure does
    renderer = fig.canvas.get_renderer()
    legend_top = fig.legends[0].get_window_extent(renderer).y1
    panels_bottom = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)
    assert legend_top <= panels_bottom, (legend_top, panels_bottom)
    plt.close(fig)
