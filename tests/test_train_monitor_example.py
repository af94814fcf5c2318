"""examples/train_monitor.py: the token streams it trains on, and a short run end to end."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from attnkit.apps.compare.tasks import Lookup, Retrieval

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_monitor.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_monitor_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lookup_stream_asks_each_key_and_its_value_follows_the_key_in_the_source(example):
    task = Lookup()
    S, d = task.vocab_sizes[0], 12
    tokens, where, answer = example.lookup_stream(task, 4, d, torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 2 * (d + 1 + task.m))
    assert where.shape == answer.shape == (4, task.m)
    for b in range(4):
        source = tokens[b, : 2 * d].view(d, 2)  # (d, 2): symbol, role
        assert tokens[b, 2 * d].item() == task.sep_symbol  # the separator, then its NONE role
        for w, a in zip(where[b].tolist(), answer[b].tolist()):
            key = tokens[b, w].item()
            assert tokens[b, w - 1].item() == S + task.query_role  # written `QUERY k`
            assert task.n_noise <= key < task.n_noise + task.n_keys
            hits = (source[:, 0] == key).nonzero().flatten()
            assert len(hits) == 1  # each key stated once, as `k v`
            assert source[hits[0], 1].item() == S + a  # the answer is the value right after it
        assert sorted(tokens[b, where[b]].tolist()) == sorted(
            source[source[:, 1] < S + task.n_values, 0].tolist()
        )  # every fact asked exactly once


def test_retrieval_stream_pads_to_one_length_and_scores_the_query_key(example):
    task = Retrieval()
    S = task.vocab_sizes[0]
    for d in (12, 30):
        tokens, where, answer = example.retrieval_stream(task, 3, d, 36, torch.Generator().manual_seed(d))
        assert tokens.shape == (3, 2 * (36 + task.slack)) and where.shape == answer.shape == (3, 1)
        for b in range(3):
            w = where[b, 0].item()
            assert tokens[b, w - 1].item() == S + task.query_role  # `QUERY k`, scored at k
            fact = 2 * ((w - 1) // 2 - d)  # the target fact, d positions before the query: `v k`
            assert tokens[b, fact + 1].item() == tokens[b, w].item()
            assert tokens[b, fact].item() == S + answer[b, 0].item()


def test_a_short_run_writes_the_log_and_the_figure(example, tmp_path, monkeypatch, capsys):
    logdir = tmp_path / "log"
    argv = ["train_monitor.py", "--minutes", "0.01", "--every", "1", "--threads", "1", "--logdir", str(logdir)]
    monkeypatch.setattr(sys, "argv", argv)
    example.main()
    out = capsys.readouterr().out
    assert "step     0" in out and "wrote" in out
    assert (logdir / "monitor-report.png").stat().st_size > 0
    with open(logdir / "heads.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["layer"] for r in rows} == {"layers.0.attn", "layers.1.attn"}
    assert {r["head"] for r in rows} == {"0", "1", "2", "3"}
    for r in rows:  # the shares are probabilities of disjoint bands
        near, far = float(r["near_share"]), float(r["far_share"])
        assert 0.0 <= near <= 1.0 and 0.0 <= far <= 1.0 and near + far <= 1.0 + 1e-6
