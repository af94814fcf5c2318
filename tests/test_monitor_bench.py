"""``attnkit bench monitor``: its argument checks, and one tiny alternated measurement run in-process."""

from __future__ import annotations

import pytest

from attnkit.apps.bench import monitor as bench
from attnkit.apps.cli import main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--every", "20", "--steps", "10"], "--every 20 must be <= --steps 10"),
        (["--dim", "10", "--heads", "3"], "--dim 10 must be divisible by --heads 3"),
        (["--rounds", "0"], "argument --rounds: expected an integer >= 1, got 0"),
    ],
)
def test_bench_monitor_errors(capsys, tmp_path, argv, expected):
    try:
        status = main(["bench", "monitor", *argv, "--out", str(tmp_path)])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit bench monitor: error: ") and expected in err
    assert list(tmp_path.iterdir()) == []  # refused before anything ran


def test_case_alternates_blocks_and_reports_the_monitor(tmp_path):
    result = bench.case(
        steps=4, rounds=2, every=2, vocab=11, dim=16, heads=2, depth=1, batch=2, length=12, threads=None, seed=0
    )
    rows = result["rows"]
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert r["unmonitored_cpu_s"] > 0 and r["monitored_cpu_s"] > 0
        assert r["cpu_ratio"] == pytest.approx(r["monitored_cpu_s"] / r["unmonitored_cpu_s"])
    assert result["monitored_steps_per_block"] == 2  # steps 0 and 2 of each block of 4
    assert result["monitor_ms_mean"] > 0 and result["attention_ms_mean"] > 0
