"""attnkit compare: tasks (solvable, deterministic, at the stated distance), matched budgets,
the gradient probe against a model whose answer is known, the training loop, and one --quick run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from attnkit.apps.compare.measure import complexity, gradient_by_distance, pick_distances
from attnkit.apps.compare.networks import (
    LSTMModel,
    ModelSize,
    SequenceModel,
    build_models,
    count_parameters,
    logits_for,
)
from attnkit.apps.compare.tasks import TASKS, Adding, Lookup, PairBatch, Retrieval, SelectiveCopy, get_task
from attnkit.apps.compare.train import TrainConfig, distance_at, evaluate, loss_and_correct, train


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and two OpenMP threads on a busy 2-core machine
    spin-wait for each other (we measured a 2-second test take 2 minutes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_from_the_seed(name):
    task = get_task(name)
    a, b, c = (task.sample(8, 40, generator=gen(s)) for s in (1, 1, 2))
    fields = ("source", "target_inputs", "targets") if task.two_sequence else ("inputs", "targets", "loss_mask")
    for f in fields:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert any(not torch.equal(getattr(a, f), getattr(c, f)) for f in fields)


def _retrieval_oracle(task: Retrieval, x: torch.Tensor, q: int) -> tuple[int, int]:
    """Answer a retrieval row by reading it: the fact whose key the query names; its value and position."""
    symbol, role = x[:, 0], x[:, 1]
    key = int(symbol[q])
    hits = [t for t in range(q) if int(symbol[t]) == key and int(role[t]) < task.n_values]
    assert len(hits) == 1, "exactly one fact carries the queried key"
    return int(role[hits[0]]), hits[0]


@pytest.mark.parametrize("d", [8, 33, 100])
def test_retrieval_is_solvable_and_the_fact_sits_exactly_d_before_the_query(d):
    task = Retrieval()
    batch = task.sample(32, d, generator=gen(3))
    assert batch.inputs.shape == (32, task.length(d), 2)
    for row in range(32):
        (q,) = batch.loss_mask[row].nonzero()[:, 0].tolist()
        value, where = _retrieval_oracle(task, batch.inputs[row], q)
        assert value == int(batch.targets[row, q])
        assert q - where == d
        facts = (batch.inputs[row, :q, 1] < task.n_values).sum()
        assert int(facts) == 1 + task.n_distractors  # the distractors are there, with other keys


def test_retrieval_target_is_not_identified_by_its_rank():
    """Distractors come before and after the target, so 'the first fact' or 'the last fact' is no shortcut."""
    task = Retrieval()
    batch = task.sample(700, 40, generator=gen(11))
    role, (rows, q) = batch.inputs[..., 1], batch.loss_mask.nonzero(as_tuple=True)
    ranks = []
    for r, qr in zip(rows.tolist(), q.tolist()):
        facts = (role[r, :qr] < task.n_values).nonzero()[:, 0].tolist()
        ranks.append(facts.index(qr - 40))
    share = torch.bincount(torch.tensor(ranks), minlength=task.n_distractors + 1).float() / len(ranks)
    assert share.min() > 0.08 and share.max() < 0.2  # about 1/7 each


def test_selective_copy_is_solvable_in_order():
    task = SelectiveCopy()
    d = 50
    batch = task.sample(16, d, generator=gen(4))
    x = batch.inputs[..., 0]
    for row in range(16):
        data = [int(t) for t in x[row, :d] if int(t) != 0]
        assert data == batch.targets[row][batch.loss_mask[row]].tolist()
        assert int(x[row, d]) == task.sep
        assert x[row, d + 1 :].tolist() == data[1:] + data[-1:] or x[row, d + 1 :].tolist() == data  # teacher forcing
    assert batch.loss_mask.sum(1).eq(task.n_data).all()


def test_adding_problem_targets_and_chance():
    task = Adding()
    batch = task.sample(64, 30, generator=gen(5))
    values, marker = batch.inputs[..., 0], batch.inputs[..., 1]
    assert marker.sum(1).eq(2).all()
    assert marker[:, :15].sum(1).eq(1).all()  # one marker in each half
    torch.testing.assert_close(batch.targets[:, -1], (values * marker).sum(1))
    # always answering 1 is within 0.04 with probability 1 - 0.96^2
    big = task.sample(20000, 10, generator=gen(6))
    hit = ((big.targets[:, -1] - 1).abs() < 0.04).float().mean().item()
    assert abs(hit - task.chance) < 0.01


def test_lookup_is_solvable_and_concatenates_for_a_decoder_only_model():
    task = Lookup()
    batch = task.sample(8, 40, generator=gen(7))
    assert isinstance(batch, PairBatch)
    for row in range(8):
        facts = {int(s): int(r) for s, r in batch.source[row].tolist() if r < task.n_values}
        asked = [int(s) for s, _ in batch.target_inputs[row].tolist()]
        assert sorted(asked) == sorted(facts)  # the same keys...
        assert [facts[k] for k in asked] == batch.targets[row].tolist()  # ...answered from the source
    cat = batch.concatenated()
    assert cat.inputs.shape == (8, 40 + 1 + task.m, 2)
    assert torch.equal(cat.inputs[:, :40], batch.source) and torch.equal(cat.inputs[:, 41:], batch.target_inputs)
    assert cat.inputs[:, 40].tolist() == [[task.sep_symbol, task.none_role]] * 8
    assert torch.equal(cat.targets[cat.loss_mask].view(8, task.m), batch.targets)


def test_tasks_reject_bad_arguments():
    with pytest.raises(ValueError, match="d must be an int >= 8"):
        Retrieval().sample(2, 3, generator=gen())
    with pytest.raises(ValueError, match="batch must be"):
        Adding().sample(0, 10, generator=gen())
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("nope")


# ---------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", sorted(TASKS))
def test_parameter_budgets_match_within_ten_percent(name):
    task = get_task(name)
    models = build_models(task, ModelSize(width=32, heads=4, depth=2))
    counts = {k: count_parameters(m) for k, m in models.items()}
    budget = counts["encoder-decoder" if task.two_sequence else "self-attention"]
    assert set(counts) == (
        {"encoder-decoder", "decoder-only", "LSTM"} if task.two_sequence else {"self-attention", "LSTM"}
    )
    for k, n in counts.items():
        assert abs(n - budget) <= 0.10 * budget, (k, n, budget)
    batch = task.sample(2, 20, generator=gen())
    for m in models.values():
        out, targets, mask = logits_for(m, batch)
        assert out.shape == (*targets.shape, task.n_outputs) and mask.shape == targets.shape


def test_the_self_attention_models_are_attnkits():
    from attnkit.nn import Transformer, TransformerEncoder

    models = build_models(get_task("lookup"), ModelSize(width=32))
    assert isinstance(models["encoder-decoder"].transformer, Transformer)
    assert isinstance(models["decoder-only"].stack, TransformerEncoder)
    assert isinstance(models["LSTM"].lstm, nn.LSTM)


def test_models_are_causal():
    """Changing a later input must not change earlier outputs (the LSTM and the self-attention model)."""
    task = get_task("retrieval")
    batch = task.sample(2, 24, generator=gen(8))
    for m in build_models(task, ModelSize(width=32)).values():
        m.eval()
        x = batch.inputs.clone()
        y = x.clone()
        y[:, 20:, 0] = (y[:, 20:, 0] + 1) % task.n_noise
        with torch.no_grad():
            torch.testing.assert_close(m(x)[:, :20], m(y)[:, :20])


# --------------------------------------------------------------------- gradient probe
class LinearRecurrence(SequenceModel):
    """h_t = a h_{t-1} + w·x_t, output h_t: the gradient reaching x_t from the loss at q is a^(q-t) times it at q."""

    kind = "linear recurrence"

    def __init__(self, task, a: float):
        super().__init__(task, 2, 1)
        self.a = a
        with torch.no_grad():  # embed = identity on the two features, head = identity
            self.embed.features.weight.copy_(torch.eye(2))
            self.embed.features.bias.zero_()
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()
        self.w = torch.tensor([1.0, 0.0])

    def mix(self, x):
        h, out = torch.zeros(x.shape[0]), []
        for t in range(x.shape[1]):
            h = self.a * h + x[:, t] @ self.w
            out.append(h)
        return torch.stack(out, dim=1)[..., None]  # (B, L, 1)


def test_gradient_probe_measures_the_known_decay():
    task = Adding()
    batch = task.sample(16, 24, generator=gen(9))
    got = gradient_by_distance(LinearRecurrence(task, 0.8), batch, task=task)
    assert got["distance"] == list(range(24))
    g = torch.tensor(got["grad_norm"], dtype=torch.float64)
    want = 0.8 ** torch.arange(24, dtype=torch.float64)
    torch.testing.assert_close(g / g[0], want, rtol=1e-5, atol=0)


def test_gradient_probe_stops_at_the_scored_position_and_lstm_gradients_fade():
    task = Retrieval()
    batch = task.sample(32, 64, generator=gen(10))
    torch.manual_seed(0)
    lstm = LSTMModel(task, width=32, hidden=32)
    got = gradient_by_distance(lstm, batch, task=task)
    assert min(got["distance"]) == 0 and max(got["distance"]) <= task.length(64) - 1
    by_d = dict(zip(got["distance"], got["grad_norm"]))
    assert by_d[64] < 1e-2 * by_d[0]  # an untrained LSTM forgets: the classic vanishing gradient


def test_complexity_follows_table_1():
    assert complexity("LSTM", 100, 8)["sequential_ops_at_n"] == 100
    assert complexity("self-attention", 100, 8)["max_path_at_n"] == 1
    assert complexity("cross-attention", 100, 8, m=10)["mix_madds_at_n"] == 2 * 100 * 10 * 8
    assert pick_distances(100) == [0, 1, 4, 16, 64, 100]


# ---------------------------------------------------------------------------- training
def test_curriculum_grows_to_d_and_stays():
    cfg = TrainConfig(steps=100, curriculum=0.5, start_distance=16)
    task = Retrieval()
    ds = [distance_at(s, 512, cfg, task) for s in range(100)]
    assert ds[0] == 16 and ds[50:] == [512] * 50 and ds == sorted(ds)
    assert distance_at(0, 512, TrainConfig(curriculum=None), task) == 512


def test_training_is_reproducible_and_learns_retrieval():
    task = Retrieval()
    cfg = TrainConfig(steps=160, batch=16, eval_examples=128, seed=1)
    accs = []
    for _ in range(2):
        model = build_models(task, ModelSize(width=64, heads=4, depth=2), seed=1)["self-attention"]
        before = evaluate(model, task, 12, cfg)
        train(model, task, 12, cfg)
        accs.append(evaluate(model, task, 12, cfg))
    assert accs[0] == accs[1]  # same seed, same result
    assert accs[0] >= 0.8 > 0.2 > before  # chance is 1/16


def test_loss_and_correct_regression_counts_within_tolerance():
    task = Adding()
    batch = task.sample(4, 10, generator=gen())

    class Exact(nn.Module):
        def forward(self, x):
            return (x[..., :1] * x[..., 1:]).cumsum(1)  # (B, L, 1): the running marked sum

    loss, correct, scored = loss_and_correct(Exact(), task, batch)
    assert float(loss) < 1e-10 and correct == scored == 4


# ------------------------------------------------------------------------------ command
def test_quick_run_writes_the_table_json_and_plots(tmp_path):
    from attnkit.apps.compare import command as compare

    out = tmp_path / "cmp"
    assert compare.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert [r["aspect"] for r in data["glance"]][:4] == [
        "How it relates positions",
        data["glance"][1]["aspect"],
        "Training speed on long sequences (tokens/s, one training step)",
        "Memory (peak of one training step)",
    ]
    assert {(r["task"], r["model"]) for r in data["accuracy"]} >= {
        ("retrieval", "self-attention"),
        ("retrieval", "LSTM"),
    }
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in data["accuracy"])
    speed = [r for r in data["speed"] if "error" not in r]
    assert {r["model"] for r in speed} == {"self-attention", "LSTM"} and all(r["tokens_per_s"] > 0 for r in speed)
    assert data["meta"]["seed"] == 0 and data["meta"]["command"]
    md = (out / "compare.md").read_text()
    assert "At a Glance, regenerated" in md and "Does the claim hold here?" in md
    for png in ("accuracy_vs_distance", "throughput_vs_length", "gradient_vs_distance", "memory_vs_length"):
        assert (out / f"{png}.png").stat().st_size > 1000


def test_cli_knows_the_command():
    from attnkit.apps.cli import build_parser

    args = build_parser().parse_args(["compare", "--quick", "--tasks", "retrieval"])
    assert args.quick and args.tasks == "retrieval"


# ------------------------------------------------------------------------------ threads (issue 12, item 10)
def test_thread_count_honours_the_users_settings(monkeypatch):
    from attnkit.apps.checks import UsageError
    from attnkit.apps.harness import thread_count, thread_env

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("MKL_NUM_THREADS", "5")
    assert thread_count(2) == (2, "--threads")
    assert thread_count(None) == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # an OpenMP list: the outer level counts
    assert thread_count(None) == (4, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_count(None) == (5, "MKL_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS")
    assert thread_count(None) == (torch.get_num_threads(), "torch's default")
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(UsageError, match="OMP_NUM_THREADS='many' is not a positive integer"):
        thread_count(None)
    assert thread_env(1) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_compare_honours_omp_num_threads_in_every_process(tmp_path):
    """With OMP_NUM_THREADS=1 the training and each fresh throughput/memory process use one thread."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    env.pop("MKL_NUM_THREADS", None)
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "attnkit", "compare", "--quick", "--steps", "2", "--tasks", "retrieval"]
    args += ["--distances", "8", "--lengths", "8", "--no-plots", "--out", str(out)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "compare.json").read_text())
    assert data["threads"] == 1 and data["threads_from"] == "OMP_NUM_THREADS"
    assert data["meta"]["machine"]["torch_threads"] == 1
    speed = [r for r in data["speed"] if "error" not in r]
    assert len(speed) == 2 and all(r["threads"] == 1 for r in speed), data["speed"]
