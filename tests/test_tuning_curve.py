"""tuning_curve.png in the report files: drawn from each task's per-round curve."""

from __future__ import annotations

from tasks.records import TaskResult
from tasks.tuning_curve import curve_points, write_tuning_curve


def test_curve_png_written_for_searched_tasks_only(tmp_path):
    searched = TaskResult("conv2d_a", 32, trials_run=32, curve=[[16, None, 1.0], [16, 2.5, 2.0], [32, 1.25, 4.5]])
    old_format = TaskResult("conv2d_b", 16, trials_run=16, curve=[[16, 0.8]])  # reports before the seconds column
    reused = TaskResult("dense", 16, reused=True)
    assert curve_points(searched) == [(16, 2.5, 2.0), (32, 1.25, 4.5)]
    assert curve_points(old_format) == [(16, 0.8, None)]
    out = write_tuning_curve([searched, old_format, reused], tmp_path / "tuning_curve.png", "mnist on local")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert write_tuning_curve([reused], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
