"""The GPU benchmark's CPU-side logic: FLOP counting, the case list, target verdicts, the results files.

The measurements themselves need a CUDA device; on a machine without one the command
says so and exits with status 2 (tested here).
"""

from __future__ import annotations

import json

import pytest

from attnkit.apps.bench import triton_gpu as bench


def test_flops_are_written_out_as_flash_attention_counts_them():
    # B=2, H=16, N=1024, D=128: forward 4 B H N^2 D
    fwd = 4 * 2 * 16 * 1024 * 1024 * 128
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=False, mode="fwd") == fwd
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=True, mode="fwd") == fwd / 2
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=False, mode="bwd") == 2.5 * fwd
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=True, mode="fwd+bwd") == 3.5 * fwd / 2
    with pytest.raises(ValueError, match="mode"):
        bench.attention_flops(1, 1, 1, 1, 1, causal=False, mode="backward")
    assert bench.tflops(2e12, 0.5) == 4.0 and bench.tflops(1.0, None) is None


def test_cases_keep_16k_tokens_and_2048_hidden():
    cases = bench.cases()
    assert len(cases) == 2 * 6 * 2
    assert {c["N"] for c in cases} == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(c["B"] * c["N"] == 16384 and c["H"] * c["D"] == 2048 for c in cases)
    assert {c["causal"] for c in cases} == {False, True}
    with pytest.raises(ValueError, match="must divide"):
        bench.cases([128], [3000])


def test_plan_runs_the_targets_first_and_flex_last():
    plan = sorted(((c, p) for c in bench.cases() for p in bench.PROVIDERS), key=bench.plan_order)
    first, last = plan[0], plan[-1]
    assert first[0]["D"] == 128 and first[0]["N"] == 16384 and first[1] == "attnkit-triton"
    assert all(p == "flex" for _, p in plan[-24:]) and last[1] == "flex"
    assert len(plan) == 24 * len(bench.PROVIDERS)


def test_card_slug():
    assert bench.card_slug("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert bench.card_slug("") == "unknown_gpu"


def _rows(triton_fwd_ms, triton_bwd_ms):
    """Hand-made rows (not measurements) to exercise the verdict logic."""
    rows = []
    for provider, fwd, bwd in (("sdpa-flash", 1.0, 2.0), ("attnkit-triton", triton_fwd_ms, triton_bwd_ms)):
        for N in (2048, 4096, 8192):
            rows.append({"provider": provider, "D": 128, "N": N, "causal": True, "fwd_ms": fwd, "bwd_ms": bwd})
    return rows


def test_target_verdicts_follow_the_rows():
    features = [
        {"feature": "plain", "fwd_ms": 1.0, "fwd+bwd_ms": 3.0},
        {"feature": "alibi", "fwd_ms": 1.05, "fwd+bwd_ms": 3.1},
        {"feature": "window", "fwd_ms": 1.2, "fwd+bwd_ms": 3.0},
        {"feature": "softcap", "fwd_ms": 1.0, "fwd+bwd_ms": 3.0},
        {"feature": "stats", "fwd_ms": 1.4},
    ]
    notes = "\n".join(bench.target_notes(_rows(0.9, 2.4), features))
    assert "fwd >= 1.0x SDPA flash (D=128, N >= 4K): worst 1.11x over 2 cases, met" in notes
    assert "bwd >= 0.8x SDPA flash (D=128, N >= 4K): worst 0.83x over 2 cases, met" in notes
    assert "alibi cost <= 10%: +5.0%" in notes and "window cost <= 10%: +20.0%" in notes
    assert "window cost <= 10%: +20.0% (worst of fwd, fwd+bwd), NOT met" in notes
    assert "statistics pass <= 1.5x forward: 1.40x, met" in notes
    slow = "\n".join(bench.target_notes(_rows(1.25, 3.0), []))
    assert "worst 0.80x over 2 cases, NOT met" in slow and "alibi cost <= 10%: not measured" in slow


def test_no_gpu_means_not_measured():
    notes = bench.target_notes([], [])
    assert all("not measured" in n for n in notes)
    assert bench.feature_lines([]) == ["Feature costs: not measured (time budget spent)."]


def test_results_files(tmp_path):
    from attnkit.apps.harness import write_results

    rows = _rows(0.9, 2.4)
    columns = [("D", "D"), ("N", "N"), ("provider", "provider"), ("fwd_ms", "fwd ms")]
    json_path, md_path = write_results("triton_gpu_TEST", rows, columns, out_dir=tmp_path, title="t", notes=["n"])
    assert json.loads(json_path.read_text())["rows"] == rows
    assert "| 128 | 4096 | attnkit-triton | 0.9 |" in md_path.read_text()


def test_command_needs_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the command would run the full benchmark")
    assert bench.main(["--out", "unused"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
