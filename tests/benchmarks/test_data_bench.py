"""The data benchmark's harness on a tiny set (no timing assertions: BENCHMARKS.md holds the numbers)."""

from __future__ import annotations

import pytest

from benchmarks import data_bench


@pytest.mark.timeout(600)
def test_data_bench_streams_every_image_and_reports_memory():
    result = data_bench.run([200, 400], workers=1, batch=64, log=lambda m: None)
    assert [r["images"] for r in result["rows"]] == [200, 400]  # one whole epoch each, nothing skipped
    assert all(r["peak_rss_mb"] > 0 and r["loader_images_per_s"] > 0 for r in result["rows"])
    assert result["step"]["step_images_per_s"] > 0
    assert "| 400 | 1 |" in data_bench.markdown(result)
