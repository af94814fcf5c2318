"""The training monitor: band shares against dense fp64 weights, the monitor's figures against the
weights of the same batch, roles against `head_roles`, `every`, the CSV and TensorBoard logs."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import attnkit
from attnkit import hooks
from attnkit.inspect import Monitor, band_shares, head_roles, record
from attnkit.inspect.monitor import HEAD_COLUMNS, STEP_COLUMNS, reach
from attnkit.nn import LanguageModel
from attnkit.options import AttentionOptions
from tests.conftest import make_qkv


def dense_bands(q, k, options: AttentionOptions, near: int, far: int):
    """``(near, far, valid)`` per row from the full fp64 weights of `attnkit.attention_weights`."""
    p = attnkit.attention_weights(q.double(), k.double(), **options.kwargs(dropout=False))  # (B, H, Lq, Lk)
    Lq, Lk = p.shape[-2:]
    dist = ((torch.arange(Lq)[:, None] + Lk - Lq) - torch.arange(Lk)[None, :]).abs()  # (Lq, Lk)
    return (p * (dist <= near)).sum(-1), (p * (dist > far)).sum(-1), p.sum(-1) > 0


CASES = {
    "plain": AttentionOptions(),
    "causal": AttentionOptions(causal=True),
    "window-alibi-softcap": AttentionOptions(window=(6, 2), alibi=True, softcap=5.0),
    "bool-mask-empty-rows": "mask",
    "float-mask": "float",
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("strip_bytes", [1, 10**9])  # one query per strip, and one strip for all
def test_band_shares_equal_dense_fp64_weights(case, strip_bytes):
    q, k, _ = make_qkv(B=2, Hq=4, Hk=2, Lq=23, Lk=31, D=8)  # GQA, Lq != Lk (bottom-right aligned)
    options = CASES[case]
    if options == "mask":
        mask = torch.rand(2, 1, 23, 31) > 0.5
        mask[0, 0, 3] = False  # a row with no allowed key
        options = AttentionOptions(mask=mask)
    elif options == "float":
        options = AttentionOptions(mask=torch.randn(1, 4, 23, 31, dtype=torch.float64))
    near, far, valid = band_shares(q, k, options, near=3, far=9, max_strip_bytes=strip_bytes)
    want_near, want_far, want_valid = dense_bands(q, k, options, 3, 9)
    torch.testing.assert_close(near, want_near, rtol=0, atol=1e-12)
    torch.testing.assert_close(far, want_far, rtol=0, atol=1e-12)
    assert torch.equal(valid, want_valid)
    assert near.dtype == torch.float64
    if case == "bool-mask-empty-rows":
        assert not valid[0, :, 3].any() and (near[0, :, 3] == 0).all()
    if case == "plain":  # both bands non-trivial, so a wrong band edge would show
        assert 0.05 < float(near.mean()) < 0.95 and 0.05 < float(far.mean()) < 0.95


def test_band_shares_fp32_and_arguments():
    q, k, _ = make_qkv(B=1, Hq=2, Hk=2, Lq=40, Lk=40, D=8, dtype=torch.float32)
    near, far, _ = band_shares(q, k, AttentionOptions(causal=True), near=0, far=4, max_strip_bytes=2048)
    want_near, want_far, _ = dense_bands(q, k, AttentionOptions(causal=True), 0, 4)
    torch.testing.assert_close(near.double(), want_near, rtol=0, atol=1e-6)
    torch.testing.assert_close(far.double(), want_far, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"far must be an int >= 8, got 4"):
        band_shares(q, k, near=8, far=4)
    with pytest.raises(ValueError, match=r"near must be an int >= 0, got -1"):
        band_shares(q, k, near=-1)


def test_reach_labels():
    assert reach(0.6, 0.1) == "local"
    assert reach(0.1, 0.5) == "long-range"
    assert reach(0.3, 0.3) == "middle"


# ------------------------------------------------------------------------------ the monitor
VOCAB, L = 29, 40


def tiny_lm(seed=0, **kw):
    torch.manual_seed(seed)
    return LanguageModel(VOCAB, 32, 4, 2, positions="alibi", **kw)


def train_step(model, opt, tokens):
    logits = model(tokens)  # (B, L, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()


class Seen:
    """A test hook that keeps every model attention call's q, k and options (outside the monitor)."""

    def __init__(self):
        self.calls = []

    def __call__(self, call, proceed):
        if call.caller is not None:
            self.calls.append((call.q.detach().clone(), call.k.detach().clone(), call.options))
        return proceed(call)


def test_monitor_figures_equal_exact_weights_of_the_same_batch():
    model = tiny_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, VOCAB, (3, L))
    seen = Seen()
    with hooks.attention_hook(seen), Monitor(model, every=5, near=2, far=10) as monitor:
        train_step(model, opt, tokens)  # step 0: monitored
        monitor.step()
    assert len(seen.calls) == 2 and len(monitor.history) == 2 * 4
    for layer, (q, k, options) in enumerate(seen.calls):
        p = attnkit.attention_weights(q.double(), k.double(), **options.kwargs(dropout=False))  # (B, H, L, L)
        dist = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs()  # (L, L)
        entropy = -(p * p.clamp(min=1e-300).log()).sum(-1).mean((0, 2))  # (H,)
        mean_distance = (p * dist).sum(-1).mean((0, 2))
        near = (p * (dist <= 2)).sum(-1).mean((0, 2))
        far = (p * (dist > 10)).sum(-1).mean((0, 2))
        sink = p[..., 0].mean((0, 2))
        rows = [r for r in monitor.history if r["layer"] == f"layers.{layer}.attn"]
        assert [r["head"] for r in rows] == [0, 1, 2, 3]
        for h, r in enumerate(rows):
            assert r["step"] == 0
            assert math.isclose(r["entropy"], float(entropy[h]), rel_tol=1e-5)
            assert math.isclose(r["mean_distance"], float(mean_distance[h]), rel_tol=1e-5)
            assert math.isclose(r["near_share"], float(near[h]), abs_tol=1e-6)
            assert math.isclose(r["far_share"], float(far[h]), abs_tol=1e-6)
            assert math.isclose(r["sink_share"], float(sink[h]), abs_tol=1e-6)
            assert r["reach"] == reach(r["near_share"], r["far_share"])
    # ALiBi's steepest head reads nearby, its flattest far: the figures tell heads apart.
    first = [r for r in monitor.history if r["layer"] == "layers.0.attn"]
    assert first[0]["near_share"] > first[-1]["near_share"] and first[0]["far_share"] < first[-1]["far_share"]


def test_focus_describes_only_the_chosen_queries():
    model = tiny_lm(2)
    tokens = torch.randint(0, VOCAB, (2, L))
    focus = torch.zeros(2, L, dtype=torch.bool)
    focus[0, -1] = focus[1, 20] = True  # one query per sequence
    seen = Seen()
    monitor = Monitor(model, every=1, near=2, far=10)
    with hooks.attention_hook(seen):
        monitor.step(tokens, focus=focus)
    q, k, options = seen.calls[0]
    p = attnkit.attention_weights(q.double(), k.double(), **options.kwargs(dropout=False))  # (B, H, L, L)
    rows = torch.stack([p[0, :, -1], p[1, :, 20]])  # (2, H, L): the focused queries
    dist = torch.stack([L - 1 - torch.arange(L), (20 - torch.arange(L)).abs()])[:, None, :]  # (2, 1, L)
    want = {
        "near_share": (rows * (dist <= 2)).sum(-1).mean(0),
        "far_share": (rows * (dist > 10)).sum(-1).mean(0),
        "mean_distance": (rows * dist).sum(-1).mean(0),
        "sink_share": rows[..., 0].mean(0),
    }
    got = [r for r in monitor.history if r["layer"] == "layers.0.attn"]
    for key, value in want.items():
        assert [r[key] for r in got] == pytest.approx(value.tolist(), rel=1e-5, abs=1e-6), key
    with pytest.raises(ValueError, match=r"focus must be a bool \(B, Lq\) = \(2, 40\) mask .* got shape \(2, 39\)"):
        monitor.step(tokens, focus=focus[:, 1:])


def test_monitor_roles_equal_head_roles_on_the_statistics_pass():
    model = tiny_lm(1)
    tokens = torch.randint(0, VOCAB, (2, L))
    tokens[:, L // 2 :] = tokens[:, : L // 2]  # a repeated half, so the token-based scores apply
    monitor = Monitor(model, every=1)
    monitor.step(tokens)  # probe mode: one no-grad forward on the batch
    with torch.no_grad(), record(model, topk=8, pool=1) as rec:
        model(tokens)
    want = head_roles(rec, tokens=tokens)
    assert [r["role"] for r in monitor.history] == [r["role"] for r in want.rows]
    for got, exp in zip(monitor.history, want.rows):
        assert math.isclose(got["entropy"], exp["entropy"], rel_tol=1e-5)
        assert math.isclose(got["sink_share"], exp["first_token"], rel_tol=1e-5)


def test_every_is_respected_and_logs_are_written(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install attnkit[monitor])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, every=3, logdir=tmp_path, near=2, far=10) as monitor:
        for _ in range(7):
            train_step(model, opt, torch.randint(0, VOCAB, (2, L)))
            monitor.step()
    assert monitor.step_count == 7
    assert [s["step"] for s in monitor.steps] == [0, 3, 6]
    assert sorted({r["step"] for r in monitor.history}) == [0, 3, 6]
    for s in monitor.steps:
        assert s["attention_forward_ms"] > 0 and s["attention_backward_ms"] > 0
        assert s["attention_ms"] == pytest.approx(s["attention_forward_ms"] + s["attention_backward_ms"])
        assert s["step_ms"] >= s["attention_forward_ms"] and s["peak_memory_mib"] > 0
        assert (s["batch"], s["length"]) == (2, L)
    with open(tmp_path / "heads.csv") as f:
        heads = list(csv.DictReader(f))
    assert tuple(heads[0]) == HEAD_COLUMNS and len(heads) == 3 * 2 * 4
    assert [float(r["near_share"]) for r in heads] == pytest.approx([r["near_share"] for r in monitor.history])
    with open(tmp_path / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert tuple(steps[0]) == STEP_COLUMNS and [int(s["step"]) for s in steps] == [0, 3, 6]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "near_share/layers.1.attn/head3" in tags and "speed_memory/peak_memory_mib" in tags
    assert [e.step for e in events.Scalars("speed_memory/attention_ms")] == [0, 3, 6]


def test_probe_mode_runs_one_forward_on_monitored_steps_only():
    model = tiny_lm()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    monitor = Monitor(model, every=2)
    for _ in range(5):
        monitor.step(torch.randint(0, VOCAB, (2, L)))
    assert len(calls) == 3 and [s["step"] for s in monitor.steps] == [0, 2, 4]
    assert all(s["attention_backward_ms"] == 0 for s in monitor.steps)  # a no-grad forward has no backward


def test_unmonitored_steps_install_no_hook():
    model = tiny_lm()
    with Monitor(model, every=2) as monitor:
        assert hooks.active()  # step 0 is watched
        model(torch.randint(0, VOCAB, (2, L)))
        monitor.step()
        assert not hooks.active()  # step 1 is not: attention runs as without a monitor
        monitor.step()
        assert hooks.active()
    assert not hooks.active()


def test_monitor_arguments():
    model = tiny_lm()
    with pytest.raises(ValueError, match=r"every must be an int >= 1, got 0"):
        Monitor(model, every=0)
    with pytest.raises(ValueError, match=r"far must be an int >= near \(8\), got 2"):
        Monitor(model, far=2)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        Monitor("model")
