"""The ``attnkit`` command: help, explain (the teaching walk-through)."""

from __future__ import annotations

import math
import re
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
    inputs = walkthrough.toy_head("the cat sat on the mat", head=0)
    assert_walkthrough_numbers(out, inputs, shown=6)


# ------------------------------------------------------------------ the walk-through's numbers, recomputed
PRINTED = 5e-4  # the tables print 3 decimals: half a unit of the last place
TOL = 1e-5  # beyond the rounding of the print


def table(block: str) -> tuple[list[str], torch.Tensor]:
    """Row names and the numbers of one printed table (a ``…`` column of omitted dims is dropped)."""
    names, rows = [], []
    for line in block.splitlines()[2:]:
        names.append(line[:12].strip())
        rows.append([float(x) for x in line[12:].split() if x != "…"])
    return names, torch.tensor(rows, dtype=torch.float64)


def assert_walkthrough_numbers(text: str, inputs: walkthrough.HeadInputs, shown: int) -> None:
    """Every number the walk-through prints equals an independent float64 computation of the same head.

    Independent: the projections, ``s = q k^T / sqrt(d_head)`` (Vaswani et al. 2017, eq. 1), the
    softmax and the mix are written out here from ``inputs``, not taken from attnkit.
    """
    x = inputs.x.double()  # (L, dim)
    q, k, v = (x @ w.double().T + b.double() for w, b in
               ((inputs.w_q, inputs.b_q), (inputs.w_k, inputs.b_k), (inputs.w_v, inputs.b_v)))  # fmt: skip
    s = q @ k.T / math.sqrt(q.shape[-1])  # (L, L)
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    w = e / e.sum(-1, keepdim=True)  # (L, L)
    parts = text.split("\n\n")
    blocks = {"x": parts[1], "q": parts[3], "k": parts[4], "v": parts[5], "scores": parts[6], "weights": parts[7]}
    assert blocks["scores"].startswith(f"3. Scores s[i, j] = q_i · k_j / sqrt({q.shape[-1]})")
    want = {"x": x[:, :shown], "q": q[:, :shown], "k": k[:, :shown], "v": v[:, :shown], "scores": s, "weights": w}
    for name, block in blocks.items():
        names, got = table(block)
        assert names == [t[:11] for t in inputs.tokens], name
        assert got.shape == want[name].shape, name
        err = (got - want[name]).abs().max().item()
        assert err <= PRINTED + TOL, f"{name}: printed values differ from the recomputation by {err:.2e}"
    # 5. the output lines: the three largest weights (2 decimals) and the rest
    lines = [line for line in parts[8].splitlines() if line.startswith("   out[")]
    assert len(lines) == len(inputs.tokens)
    for i, line in enumerate(lines):
        printed = [float(t.split("·")[0]) for t in line.split(" = ")[1].split(" + ") if "·v[" in t]
        top = w[i].topk(3).values
        assert torch.allclose(torch.tensor(printed, dtype=torch.float64), top, rtol=0, atol=5e-3 + TOL), line
        rest = 1 - top.sum().item()
        if rest > 0.005:
            assert f"({rest:.2f} spread over the rest)" in line, line
    # the check line: attnkit's output and weights against the printed recipe, both within TOL
    check = [float(t) for t in re.findall(r"to (\d\.\de[+-]\d\d)", parts[9])]
    assert len(check) == 2 and max(check) <= TOL, parts[9]


def test_minilm_walkthrough_numbers_equal_a_recomputation():
    inputs = walkthrough.minilm_head("The cat sat on the mat.", head=2, layer=1)
    assert_walkthrough_numbers(walkthrough.walkthrough(inputs, shown=4), inputs, shown=4)


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
