"""The ``attnkit`` command: help, explain (the teaching walk-through)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from attnkit.apps import walkthrough
from attnkit.apps.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "explain" in out and "bench" in out


def test_explain_toy_walkthrough_is_consistent(capsys):
    assert main(["explain", "--toy", "the cat sat on the mat"]) == 0
    out = capsys.readouterr().out
    for step in ("1. Token embeddings", "3. Scores", "4. Weights", "5. Output", "Check:"):
        assert step in out
    assert "out[cat] =" in out
    # The check line reports how far the printed mix is from attnkit.attention: tiny.
    check = out.split("Check:")[1]
    assert "to 0.0e+00" in check or "e-0" in check


def test_walkthrough_weights_rows_sum_to_one():
    inputs = walkthrough.toy_head("a b c d", head=1)
    text = walkthrough.walkthrough(inputs, shown=3)
    weights_block = text.split("4. Weights")[1].split("5. Output")[0].strip().splitlines()[2:]
    for line in weights_block:
        values = [float(x) for x in line.split()[1:]]
        assert abs(sum(values) - 1) < 5e-3


@pytest.mark.parametrize("module", ["attnkit", "attnkit.apps.cli"])
def test_module_entry_point_runs(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "explain", "--toy", "one two three"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Self-attention, one head" in proc.stdout


def test_minilm_head_weights_equal_the_models_own_attention():
    """explain's numbers are the real model's: its head's weights equal BERT's output_attentions."""
    import attnkit
    from attnkit.models.bert import load_bert

    text = "The cat sat on the mat because it was tired."
    inputs = walkthrough.minilm_head(text, head=3, layer=2)
    q = inputs.x @ inputs.w_q.T + inputs.b_q  # (L, dh)
    k = inputs.x @ inputs.w_k.T + inputs.b_k
    weights = attnkit.attention_weights(q[None, None], k[None, None])[0, 0]
    model, tokenizer = load_bert()
    batch = tokenizer(text)
    with torch.no_grad():
        expected = model(**batch, output_attentions=True).attentions[2][0, 3]
    assert inputs.tokens[0] == "[CLS]" and len(inputs.tokens) == expected.shape[0]
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=0)


def test_version_is_the_packages_one():
    import importlib.metadata
    import subprocess
    import sys

    import attnkit

    done = subprocess.run([sys.executable, "-m", "attnkit", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip() == f"attnkit {attnkit.__version__}" == f"attnkit {importlib.metadata.version('attnkit')}"
