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


# ------------------------------------------------------------------ --quick
def test_quick_plan_covers_the_issue_cases_d128_first():
    cases = [(c["D"], c["N"], c["causal"]) for c in bench.QUICK_CASES]
    assert cases == [(128, 8192, False), (128, 8192, True), (64, 4096, False), (64, 4096, True)]
    assert all(c["B"] * c["N"] == 16384 and c["H"] * c["D"] == 2048 for c in bench.QUICK_CASES)
    assert bench.QUICK_PROVIDERS == ("attnkit-triton", "sdpa-flash")
    assert set(bench.QUICK_FEATURES) == {"plain", "softcap", "alibi", "window"}
    assert bench.BACKWARD_KERNELS == ("_prep_kernel", "_dkdv_kernel", "_dq_kernel")
    assert bench.QUICK_BUDGET < 300  # measuring leaves room for the compiles within 5 minutes


def _quick_measurements():
    """Hand-made measurements (not from a GPU) for the report logic."""
    throughput = []
    for case in bench.QUICK_CASES:
        for provider, fwd, bwd in (("attnkit-triton", 2.0, 8.0), ("sdpa-flash", 2.2, 6.0)):
            throughput.append({"provider": provider, **case, "fwd_ms": fwd, "bwd_ms": bwd, "fwd_tflops": 300.0,
                               "bwd_tflops": 200.0})  # fmt: skip
    errors = [{"D": 128, "N": 8192, "causal": True, "out": 0.004, "dq": 0.02, "dk": 0.03, "dv": 0.01}]
    split = [
        {"D": 128, "N": 8192, "causal": True, "kernel": "_prep_kernel", "ms": 0.5},
        {"D": 128, "N": 8192, "causal": True, "kernel": "_dkdv_kernel", "ms": 5.0},
        {"D": 128, "N": 8192, "causal": True, "kernel": "_dq_kernel", "ms": 4.5},
    ]
    features = [
        {"feature": "plain", "fwd_ms": 1.0},
        {"feature": "softcap", "fwd_ms": 1.2},
        {"feature": "alibi", "fwd_ms": 1.15},
        {"feature": "window", "error": "RuntimeError: boom"},
    ]
    return throughput, errors, split, features


def test_quick_report_rows_and_verdicts():
    rows, columns, notes = bench.quick_report(*_quick_measurements())
    assert len(rows) == len(bench.QUICK_CASES) and {c for c, _ in columns} >= {"fwd_vs_sdpa", "bwd_split", "max_err"}
    causal128 = next(r for r in rows if r["D"] == 128 and r["causal"])
    assert causal128["fwd_vs_sdpa"] == 1.1 and causal128["bwd_vs_sdpa"] == 0.75
    assert causal128["max_err"] == 0.03
    assert causal128["bwd_split"] == "_prep_kernel 5%, _dkdv_kernel 50%, _dq_kernel 45%"
    text = "\n".join(notes)
    assert "fwd >= 1.0x SDPA-flash at D=128: worst 1.10x, met" in text
    assert "bwd >= 0.8x SDPA-flash at D=128: worst 0.75x, NOT met" in text
    assert "softcap: 1.200 ms vs 1.000 ms plain (+20.0%; target <= 25%, met)" in text
    assert "alibi: 1.150 ms vs 1.000 ms plain (+15.0%; target <= 10%, NOT met)" in text
    assert "window: not measured (RuntimeError: boom)" in text
    empty_rows, _, empty_notes = bench.quick_report([], [], [], [])
    assert empty_rows == [] and all("not measured" in n for n in empty_notes)


def test_quick_results_files(tmp_path):
    from attnkit.apps.harness import write_results

    rows, columns, notes = bench.quick_report(*_quick_measurements())
    json_path, md_path = write_results("triton_quick_TEST", rows, columns, out_dir=tmp_path, title="q", notes=notes)
    assert json.loads(json_path.read_text())["rows"] == rows
    md = md_path.read_text()
    assert "| 128 | 8192 | True | 300 | 300 | 1.1 | 200 | 200 | 0.75 | 0.03 |" in md and "worst 0.75x, NOT met" in md


def test_quick_needs_a_gpu(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the command would run the quick check")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
