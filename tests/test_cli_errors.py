"""A user error is one line on stderr and exit status 2, before the model loads (issue 12, item 8).

Each case runs the command as a user would (``attnkit.apps.cli.main(argv)``, or a fresh
process where the environment matters) with the model loaders replaced by a function that
fails the test: an error reported after the model loaded is a regression too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit.apps import checks
from attnkit.apps.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def no_model(monkeypatch):
    """Every way the commands load a model fails the test (the checks must come first)."""
    import attnkit.models.bert as bert
    from attnkit.apps.compare import command as compare
    from attnkit.apps.show import pretrained

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded (or the work began) before the arguments were checked")

    monkeypatch.setattr(pretrained, "_load_model", loaded)
    monkeypatch.setattr(bert, "load_bert", loaded)
    monkeypatch.setattr(compare, "_accuracy", loaded)


def fails(capsys, argv: list[str]) -> str:
    """Run ``attnkit ARGV``; it must exit with status 2 and one line on stderr, returned."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    captured = capsys.readouterr()
    assert status == 2, (status, captured.err)
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), captured.err
    assert captured.err.startswith(f"attnkit {argv[0]}") or captured.err.startswith("attnkit:"), captured.err
    return captured.err.strip()


# ------------------------------------------------------------------------------ output paths
def test_out_is_a_directory(capsys, no_model, tmp_path):
    err = fails(capsys, ["show", "Hello world.", "--out", str(tmp_path)])
    assert f"--out {tmp_path} is a directory" in err and "report.html" in err


def test_out_under_a_file(capsys, no_model, tmp_path):
    (tmp_path / "afile").write_text("x")
    err = fails(capsys, ["show", "Hello world.", "--out", str(tmp_path / "afile" / "r.html")])
    assert f"{tmp_path / 'afile'} is a file, not a directory" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_out_where_nothing_can_be_created(capsys, no_model):
    # /proc refuses new files even to root, so this case holds whoever runs the tests
    err = fails(capsys, ["show", "Hello world.", "--out", "/proc/attnkit-test/report.html"])
    assert "--out /proc/attnkit-test/report.html: cannot create a file in /proc" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(capsys, no_model, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        err = fails(capsys, ["show", "Hello world.", "--out", str(folder / "sub" / "report.html")])
    finally:
        folder.chmod(0o700)
    assert f"cannot create a file in {folder}" in err


def test_png_is_a_file(capsys, no_model, tmp_path):
    (tmp_path / "afile").write_text("x")
    err = fails(capsys, ["show", "Hello world.", "--out", str(tmp_path / "r.html"), "--png", str(tmp_path / "afile")])
    assert "--png" in err and "is a file; give a folder" in err


def test_png_without_matplotlib_is_refused_up_front(capsys, no_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    err = fails(capsys, ["show", "Hello world.", "--out", str(tmp_path / "r.html"), "--png", str(tmp_path / "png")])
    assert err == "attnkit show: error: --png needs matplotlib: pip install 'attnkit[viz]'"
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "png").exists()


def test_png_without_matplotlib_in_a_fresh_process(tmp_path):
    """The same through the installed entry point, as a user sees it."""
    code = (
        "import sys; sys.modules['matplotlib'] = None; from attnkit.apps.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    args = [sys.executable, "-c", code, "show", "Hello.", "--png", "png", "--out", "r.html"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "attnkit show: error: --png needs matplotlib: pip install 'attnkit[viz]'"
    ], done.stderr
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ the model and the text
def test_pickle_only_checkpoint_is_refused_by_name(capsys, no_model, tmp_path):
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    torch.save({"weight": torch.zeros(2)}, model / "pytorch_model.bin")
    err = fails(capsys, ["show", "Hello world.", "--model", str(model), "--out", str(tmp_path / "r.html")])
    assert f"no *.safetensors weights in {model}" in err and "pytorch_model.bin" in err
    assert "needs safetensors" in err


@pytest.mark.parametrize("text", ["\u200b", "\u200b\u200b \x00"])
def test_text_with_no_tokens(capsys, no_model, tmp_path, text):
    err = fails(capsys, ["show", text, "--out", str(tmp_path / "r.html")])
    assert "has no token all-MiniLM-L6-v2 reads" in err


@pytest.mark.parametrize("text", ["", "  \n "])
def test_empty_text(capsys, no_model, tmp_path, text):
    assert fails(capsys, ["show", text, "--out", str(tmp_path / "r.html")]) == "attnkit show: error: TEXT is empty"


def test_empty_file(capsys, no_model, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    err = fails(capsys, ["show", "--file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r.html")])
    assert "holds no text" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--map-budget", "-5"], "argument --map-budget: expected an integer >= 0, got -5"),
        (["--links", "-1"], "argument --links: expected an integer >= 0, got -1"),
        (["--max-tokens", "2"], "argument --max-tokens: expected an integer >= 3, got 2"),
        (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
        (["--threads", "two"], "argument --threads: expected an integer >= 1, got 'two'"),
        (["--example", "protein", "--max-tokens", "10"], "--example protein reads the whole sequence"),
        (["--example", "protein", "--model", "x"], "--example protein runs its own character-level model"),
    ],
)
def test_show_numbers_and_combinations(capsys, no_model, tmp_path, argv, expected):
    err = fails(capsys, ["show", *argv, "--out", str(tmp_path / "r.html")])
    assert expected in err


def test_max_tokens_beyond_the_model_is_refused_before_it_loads(capsys, no_model, tmp_path):
    err = fails(capsys, ["show", "Hello world.", "--max-tokens", "100000", "--out", str(tmp_path / "r.html")])
    assert "--max-tokens must lie in [3, 512] for all-MiniLM-L6-v2, got 100000" in err


def test_a_file_named_like_a_placeholder(tmp_path, capsys):
    """A title holding ``{{JS}}`` is substituted without being scanned for placeholders."""
    path = tmp_path / "{{JS}}.txt"
    path.write_text("The cat sat on the mat because it was tired.")
    out = tmp_path / "report.html"
    assert main(["show", "--file", str(path), "--out", str(out), "--no-progress"]) == 0
    page = out.read_text()
    assert "<title>What the model attends to in {{JS}}.txt</title>" in page
    assert page.count("<script") == 2 and "{{CSS}}" not in page and "{{DATA}}" not in page


def test_render_report_substitutes_each_placeholder_once():
    """Placeholders in the title or the tokens stay text; the template's own are each filled once."""
    import numpy as np

    from attnkit.viz import report

    L = 4
    tokens = ["{{JS}}", "{{DATA}}", "{{CSS}}", "{{TITLE}}"]
    index = np.broadcast_to(np.arange(L)[None, None, :, None], (1, 1, L, 1)).copy()  # (N, H, L, k): self links
    data = report.ReportData(tokens, np.full((1, 1, L, L), 1.0 / L), index, np.ones((1, 1, L, 1)), title="{{JS}}")
    page = report.render_report(data)
    assert "<title>{{JS}}</title>" in page
    assert page.count(report._asset("report.js")) == 1 and page.count(report._asset("report.css")) == 1
    assert 'content="{{CSP}}"' not in page and "<style>{{CSS}}</style>" not in page


# ------------------------------------------------------------------------------ explain
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--layer", "6"], "--layer 6 is out of range: all-MiniLM-L6-v2 has layers 0 to 5"),
        (["--head", "12"], "--head 12 is out of range: all-MiniLM-L6-v2 has heads 0 to 11"),
        (["--layer", "-1"], "argument --layer: expected an integer >= 0, got -1"),
        (["--dims", "0"], "argument --dims: expected an integer >= 1, got 0"),
        (["--toy", "--layer", "1"], "--layer 1 is out of range: the toy model has one layer, 0"),
        ([""], "TEXT is empty"),
        (["   "], "TEXT is empty"),
        (["--toy", ""], "TEXT is empty"),
        (["\u200b"], "has no token all-MiniLM-L6-v2 reads"),
    ],
)
def test_explain_errors(capsys, no_model, argv, expected):
    err = fails(capsys, ["explain", *argv])
    assert expected in err


def test_explain_counts_layer_and_head_from_zero(capsys):
    assert main(["explain", "--layer", "2", "--head", "3", "The cat sat."]) == 0
    out = capsys.readouterr().out
    assert "layer 2, head 3 (both counted from 0" in out and "layer 3" not in out
    help_text = _help(capsys, ["explain", "--help"])
    assert "which layer, counted from 0" in help_text and "which head, counted from 0" in help_text


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------ compare and bench
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--lr", "-1"], "argument --lr: expected a finite number > 0, got '-1'"),
        (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
        (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
        (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
        (["--case-timeout", "0"], "argument --case-timeout: expected a finite number > 0, got '0'"),
        (["--distances", "0"], "argument --distances: expected positive integers, got '0'"),
        (["--width", "64", "--heads", "5"], "--width 64 must be divisible by --heads 5"),
        (["--tasks", "poem"], "--tasks must name tasks among"),
        (["--tasks", ","], "--tasks names no task"),
        (["--distances", "2"], "--distances: task 'retrieval' needs distances >= 8, got 2"),
        (["--tasks", "retrieval", "--lengths", "3"], "--lengths: task 'retrieval' needs distances >= 8, got 3"),
    ],
)
def test_compare_errors(capsys, no_model, tmp_path, argv, expected):
    err = fails(capsys, ["compare", "--quick", "--out", str(tmp_path / "cmp"), *argv])
    assert expected in err


def test_compare_output_folder(capsys, no_model, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    err = fails(capsys, ["compare", "--quick", "--out", str(tmp_path / "afile")])
    assert "is a file; give a folder" in err
    err = fails(capsys, ["compare", "--quick", "--out", str(tmp_path / "afile" / "sub")])
    assert "is a file, not a directory" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = fails(capsys, ["compare", "--quick", "--out", str(tmp_path / "cmp")])
    assert err == "attnkit compare: error: the plots needs matplotlib: pip install 'attnkit[viz]', or pass --no-plots"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["kernels", "--sizes", "0"], "argument --sizes: expected an integer >= 1, got 0"),
        (["kernels", "--timeout", "-1"], "argument --timeout: expected a finite number > 0, got '-1'"),
        (["kernels", "--memory-limit-gib", "0"], "expected a finite number > 0"),
        (["mha", "--dim", "10", "--heads", "3"], "--dim 10 must be divisible by --heads 3"),
        (["mha", "--lengths", "-8"], "argument --lengths: expected an integer >= 1, got -8"),
        (["stats", "--topk", "0"], "argument --topk: expected an integer >= 1, got 0"),
        (["distributed", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["distributed", "--heads", "8", "--kv-heads", "3"], "--heads 8 must be a multiple of --kv-heads 3"),
        (["triton", "--budget", "0"], "argument --budget: expected a finite number > 0, got '0'"),
    ],
)
def test_bench_errors(capsys, tmp_path, argv, expected):
    err = fails(capsys, ["bench", *argv, "--out", str(tmp_path / "results")])
    assert err.startswith(f"attnkit bench {argv[0]}: error: ") and expected in err


@pytest.mark.parametrize("name", ["kernels", "mha", "stats", "distributed", "triton"])
def test_bench_output_folder(capsys, tmp_path, name, monkeypatch):
    from attnkit.apps import harness

    def ran(*args, **kwargs):
        raise AssertionError("a case ran before --out was checked")

    monkeypatch.setattr(harness, "run_case", ran)
    (tmp_path / "afile").write_text("x")
    err = fails(capsys, ["bench", name, "--out", str(tmp_path / "afile")])
    afile = tmp_path / "afile"
    assert err == f"attnkit bench {name}: error: --out {afile} is a file; give a folder (it is created if missing)"


# ------------------------------------------------------------------------------ the checks themselves
def test_checks_leave_nothing_behind(tmp_path):
    checks.check_output_file(tmp_path / "a" / "b" / "report.html", "--out")
    checks.check_output_dir(tmp_path / "c", "--png")
    checks.check_output_dir(tmp_path, "--png")
    assert list(tmp_path.iterdir()) == []


def test_module_entry_points_report_errors_the_same_way(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for module in ("attnkit.apps.compare.command", "attnkit.apps.bench.kernels"):
        args = [sys.executable, "-m", module, "--out", "/proc/attnkit-test"]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().endswith(
            "--out /proc/attnkit-test: cannot create a file in /proc (No such file or directory)"
        )
        assert done.stderr.count("\n") == 1, done.stderr
