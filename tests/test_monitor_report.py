"""``attnkit monitor-report``: reads a Monitor log, says when each head settled, draws PNG and HTML."""

from __future__ import annotations

import pytest
import torch

from attnkit.apps import monitor_report
from attnkit.apps.cli import main
from attnkit.inspect import Monitor
from attnkit.nn import LanguageModel

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install attnkit[monitor])")


def row(step, layer, head, reach, role):
    return {"step": step, "layer": layer, "head": head, "reach": reach, "role": role, "near_share": 0.5,
            "far_share": 0.1}  # fmt: skip


def test_settled_finds_the_step_from_which_a_label_holds():
    heads = [
        row(0, "a", 0, "middle", "broad"), row(0, "a", 1, "middle", "broad"),
        row(5, "a", 0, "local", "broad"), row(5, "a", 1, "long-range", "mixed"),
        row(10, "a", 0, "middle", "broad"), row(10, "a", 1, "long-range", "mixed"),
        row(15, "a", 0, "local", "local"), row(15, "a", 1, "long-range", "mixed"),
    ]  # fmt: skip
    got = {r["head"]: (r["label"], r["since"], r["first"]) for r in monitor_report.settled(heads, "reach")}
    assert got == {0: ("local", 15, "middle"), 1: ("long-range", 5, "middle")}
    lines = monitor_report.summary_lines(heads)
    assert lines[0].startswith("a head 0: local since step 15") and "role local since step 15" in lines[0]
    assert lines[1].startswith("a head 1: long-range since step 5") and "role mixed since step 5" in lines[1]


def test_report_renders_from_a_monitor_log(tmp_path, capsys):
    torch.manual_seed(0)
    model = LanguageModel(23, 16, 2, 2, positions="alibi")
    monitor = Monitor(model, every=2, logdir=tmp_path, tensorboard=False, near=2, far=6)
    for _ in range(5):
        monitor.step(torch.randint(0, 23, (2, 16)))
    monitor.close()
    assert main(["monitor-report", str(tmp_path), "--png", str(tmp_path / "fig" / "roles.png")]) == 0
    png = (tmp_path / "fig" / "roles.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (tmp_path / "monitor-report.html").read_text()
    assert "data:image/png;base64," in page and "layers.1.attn head 1" in page
    out = capsys.readouterr().out
    assert out.count("layers.") == 4 and "from the start" in out


def test_report_errors_name_the_argument(tmp_path, capsys):
    assert main(["monitor-report", str(tmp_path)]) == 2
    assert "holds no heads.csv" in capsys.readouterr().err
    assert main(["monitor-report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
