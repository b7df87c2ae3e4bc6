"""
docs/benchmarks.md is written whole by bench/report.py from the results in
docs/benchmarks.json: the page is never edited by hand, so its figures are
always the ones of a run.
"""

from __future__ import annotations

import json
import pathlib

from bench import report
from bench.measures import STEPS

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = json.loads((ROOT / "docs" / "benchmarks.json").read_text(encoding="utf-8"))


def test_page_is_the_report_of_its_json() -> None:
    """
    docs/benchmarks.md is exactly what the report writes from
    docs/benchmarks.json with today's method text.
    """
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert page == report.page(RESULTS, STEPS), (
        "docs/benchmarks.md differs from what bench/report.py writes: change the "
        "method in bench/report.py, then run `.venv/bin/python -m bench.report`")


def test_targets_and_ratios_follow_from_the_measures() -> None:
    """
    The targets table and the ratios the report computes from the run's
    measures are the ones the run recorded.
    """
    assert report.targets(RESULTS) == RESULTS["targets"]
    assert report.ratios(RESULTS) == RESULTS["ratios"]

