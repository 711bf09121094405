"""The benchmark report logic (wrk output parsing, ratios, targets) without running load."""

from __future__ import annotations

from typing import Any, Dict

import pytest

from benchmarks.run import _bytes, _seconds, render, targets_table


def test_wrk_units() -> None:
    assert _seconds("152.00us") == pytest.approx(152e-6)
    assert _seconds("1.50ms") == pytest.approx(1.5e-3)
    assert _seconds("2.00s") == 2.0
    assert _bytes("1.25GB") == 1.25 * 1024**3
    assert _bytes("512.00KB") == 512 * 1024


def _results(pypy_rps: float, nginx_rps: float, haproxy_rps: float = 0.0) -> Dict[str, Any]:
    row = lambda rps: {"get64": {"rps": rps, "p50": 0.001, "p99": 0.002}}  # noqa: E731
    return {
        "machine": {
            "date": "d",
            "cpu": "c",
            "cores": "2",
            "kernel": "k",
            "cpython": "3.11",
            "pypy": "pypy",
            "nginx": "n",
        },
        "duration": 8,
        "targets": dict(
            {"direct": row(50000.0), "pyproxy-pypy": row(pypy_rps), "nginx": row(nginx_rps)},
            **({"haproxy": row(haproxy_rps)} if haproxy_rps else {}),
        ),
    }


def test_targets_are_judged_by_ratio_to_the_faster_c_proxy() -> None:
    met = targets_table(_results(pypy_rps=33000.0, nginx_rps=30000.0))
    assert "| PyPy small GET ≥ 1.0 × the faster of nginx and HAProxy | 1.10× | yes |" in met
    missed = targets_table(_results(pypy_rps=33000.0, nginx_rps=30000.0, haproxy_rps=40000.0))
    assert "| PyPy small GET ≥ 1.0 × the faster of nginx and HAProxy | 0.82× | **no** |" in missed


def test_render_has_ratio_columns() -> None:
    table = render(_results(pypy_rps=20000.0, nginx_rps=40000.0, haproxy_rps=25000.0))
    assert "| pyproxy-pypy | 20,000 | 1.00 ms | 2.00 ms | 0.50× | 0.80× | 0.40× | – |" in table
