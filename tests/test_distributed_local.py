"""The distributed pieces in one process: a gloo group of one, no group at all, and ranks as threads.

A group of one runs every code path a rank runs except the messages: sharding through the group
(`shard_sequence` / `unshard_sequence`), `context_parallel`'s handle and its refusals, and the
`PeerError` a failed collective becomes. Ranks as threads (tests/threaded_group.py) run ring and
Ulysses attention's messages: tests/test_distributed.py's worker functions and checks, every
case at 2, 3 and 4 ranks, the disagreeing peers and the dead or hung peer, in seconds, which
makes them cheap enough for the mutation run. The process suites stay: they are the real gloo.
"""

from __future__ import annotations

import datetime
import time
import typing

import pytest
import torch
import torch.distributed as dist

import attnkit
from attnkit.distributed import (
    LAYOUTS,
    ContextParallel,
    Layout,
    PeerError,
    context_parallel,
    merge_shards,
    padded_length,
    ring_attention,
    shard,
    shard_sequence,
    ulysses_attention,
    unshard_sequence,
)
from attnkit.distributed.ring import peer_failed
from attnkit.nn import LanguageModel, SelfAttention
from tests.test_distributed import (
    CASES,
    PEER_CASES,
    PEER_WORLD,
    WORLDS,
    _run_case,
    _run_peer_suite,
    check_agreeing,
    check_bytes,
    check_fault,
    check_late,
    check_matches,
    check_mismatched_peers,
    check_rejected,
    timed_call,
)
from tests.threaded_group import ThreadGroup


@pytest.fixture
def group_of_one(tmp_path):
    """The default process group, of one rank, for the test's duration."""
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=20))
    yield
    dist.destroy_process_group()


def test_without_a_group_the_group_functions_say_so():
    assert not dist.is_initialized()
    x = torch.randn(1, 2, 6, 4)
    for fn in (lambda: shard_sequence(x), lambda: unshard_sequence(x)):
        with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised; call"):
            fn()
    with pytest.raises(RuntimeError, match=r"context_parallel: torch\.distributed is not initialised"):
        context_parallel(LanguageModel(8, 8, 2, 1, max_len=8))


def test_the_layout_type_names_the_layouts():
    assert typing.get_args(Layout) == LAYOUTS == ("contiguous", "zigzag")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("L", [1, 6, 7])
def test_shard_and_unshard_through_a_group_of_one(group_of_one, layout, L):
    x = torch.randn(2, 3, L, 5)
    local = shard_sequence(x, layout=layout)  # (B, H, L_pad, D): the one rank holds everything, padded
    assert local.shape == (2, 3, padded_length(L, 1, layout), 5)
    assert torch.equal(local, shard(x, 0, 1, layout=layout))
    assert torch.equal(local[:, :, :L], x) and bool((local[:, :, L:] == 0).all())  # zero padding at the end
    back = unshard_sequence(local, layout=layout, seq_len=L)
    assert torch.equal(back, x) and not back.requires_grad
    tokens = torch.arange(2 * L).view(2, L)
    assert torch.equal(unshard_sequence(shard_sequence(tokens, layout=layout, dim=1), layout=layout, dim=1,
                                        seq_len=L), tokens)  # fmt: skip
    assert unshard_sequence(local, layout=layout).shape[2] == padded_length(L, 1, layout)  # seq_len=None keeps all


def test_merge_shards_refuses_what_does_not_fit():
    a, b = torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 3, 2)
    with pytest.raises(ValueError, match="every shard must have length 4 along dim 2"):
        merge_shards([a, b])
    with pytest.raises(ValueError, match="seq_len=9 exceeds the 8 positions held"):
        merge_shards([a, a], seq_len=9)


def test_a_failed_collective_becomes_a_peer_error(group_of_one):
    cause = RuntimeError("Connection closed by peer")
    err = peer_failed("ring_attention", None, "exchanging key/value shards", cause)
    assert isinstance(err, PeerError) and isinstance(err, RuntimeError)
    msg = str(err)
    assert msg.startswith("ring_attention: rank 0 of 1 failed exchanging key/value shards: a peer likely failed")
    assert "Process-group timeout: 20 s" in msg and msg.endswith("Cause: Connection closed by peer")
    with pytest.raises(PeerError, match="a peer likely failed") as info:
        raise err from cause
    assert info.value.__cause__ is cause


def model_and_tokens(positions="rope", **kw):
    torch.manual_seed(0)
    model = LanguageModel(16, 8, 2, 2, positions=positions, max_len=32, **kw).double().eval()
    return model, torch.randint(0, 16, (1, 6))


def test_the_handle_is_a_context_parallel_and_restore_undoes_it(group_of_one):
    model, tokens = model_and_tokens("learned")
    want = model(tokens)
    cp = context_parallel(model, layout="zigzag", method="ulysses", seq_len=5)
    assert isinstance(cp, ContextParallel)
    assert (cp.layout, cp.method, cp.seq_len, cp.model) == ("zigzag", "ulysses", 5, model)
    assert [type(m).__name__ for m in cp.position_modules] == ["LearnedPositions"] and len(cp.modules) == 2
    cp.seq_len = None  # per batch: the 6 tokens are the whole (unpadded) sequence
    torch.testing.assert_close(model(tokens), want)
    cp.restore()
    assert not attnkit.hooks.active() and cp.modules == [] and cp.position_modules == []
    assert all("forward" not in vars(m) for m in model.modules())  # every position forward put back
    cp.restore()  # a second restore is harmless


def test_context_parallel_refuses_what_cannot_be_split(group_of_one):
    with pytest.raises(
        ValueError, match=r"context_parallel: layout must be one of \('contiguous', 'zigzag'\), got 'x'"
    ):
        context_parallel(model_and_tokens()[0], layout="x")
    with pytest.raises(ValueError, match="method must be 'ring' or 'ulysses', got 'tree'"):
        context_parallel(model_and_tokens()[0], method="tree")
    model, tokens = model_and_tokens()
    attn = model.layers[0].attn
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    with context_parallel(model) as cp:
        where = r"context_parallel \(layers\.0\.attn \(SelfAttention\)\)"
        with pytest.raises(ValueError, match=where + ": attention dropout is not supported .* dropout_p=0.5"):
            attnkit.attention(q, q, q, dropout_p=0.5, caller=attn)
        with pytest.raises(ValueError, match=where + ": return_lse is not supported"):
            attnkit.attention(q, q, q, return_lse=True, caller=attn)
        longer = torch.randn(1, 2, 9, 4, dtype=torch.float64)
        with pytest.raises(ValueError, match=where + r": queries and keys must be the same sharded sequence .* "
                                             r"got q \(1, 2, 6, 4\), k \(1, 2, 9, 4\)"):  # fmt: skip
            attnkit.attention(q, longer, longer, caller=attn)
        rope = cp.position_modules[0]
        with pytest.raises(ValueError, match="a RotaryEmbedding offset \\(KV cache\\) is not supported"):
            rope(q, q, offset=3)
        torch.testing.assert_close(model(tokens), model_and_tokens()[0](tokens))  # still computes
    learned, _ = model_and_tokens("learned")
    with context_parallel(learned) as cp, pytest.raises(ValueError, match=r"a position offset \(KV cache\) is not"):
        cp.position_modules[0](torch.zeros(1, 6, 8, dtype=torch.float64), offset=2)
    assert not attnkit.hooks.active()


def test_cross_attention_alone_is_no_context_parallel_model(group_of_one):
    with pytest.raises(ValueError, match="no attnkit self-attention module"):
        context_parallel(attnkit.nn.CrossAttention(8, 2))
    assert not attnkit.hooks.active()
    context_parallel(SelfAttention(8, 2)).restore()  # a bare module is a model of one


# ------------------------------------------------------- ranks as threads of one process
# The process suites' own worker functions and checks (tests/test_distributed.py), over
# tests/threaded_group.py's group of threads: every message of ring and Ulysses attention,
# in seconds, without processes. (Sharding and context_parallel stay with the process suites.)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(CASES))
def test_ranks_as_threads_match_single_process_and_send_the_formulas_bytes(monkeypatch, world, case):
    group = ThreadGroup(world)
    results = group.run(lambda rank: {case: _run_case(CASES[case], rank, world, counter=group.counter)}, monkeypatch)
    check_matches(results, world, case)
    if "padded" not in case and "-dv" not in case:
        check_bytes(results, world, case)


@pytest.fixture
def thread_peer_results(monkeypatch) -> dict[int, dict]:
    return ThreadGroup(PEER_WORLD).run(lambda rank: _run_peer_suite(rank, PEER_WORLD), monkeypatch)


def test_ranks_as_threads_that_disagree_or_reject_all_raise_and_then_still_compute(thread_peer_results):
    for case in PEER_CASES:
        check_mismatched_peers(thread_peer_results, case)
    check_rejected(thread_peer_results)
    check_agreeing(thread_peer_results)
    check_late(thread_peer_results)


@pytest.mark.parametrize("method", ["ring", "ulysses"])
@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_ranks_as_threads_fail_fast_when_a_peer_dies_or_hangs(monkeypatch, method, fault):
    timeout_s = 1.0
    fn = ring_attention if method == "ring" else ulysses_attention

    def rank_main(rank: int) -> dict | None:
        if rank == 1:  # the faulty peer: gone at once (as a process that exited), or silent past the timeout
            if fault == "hangs":
                time.sleep(timeout_s + 1.0)
            return None
        x = torch.randn(1, 2, 4, 8)
        return timed_call(fn, x, x, x)

    check_fault(ThreadGroup(2, timeout_s).run(rank_main, monkeypatch)[0], fault, method, timeout_s)


def test_the_thread_group_refuses_what_gloo_refuses(monkeypatch):
    """The stand-in is only worth its checks if it fails where gloo does: wrong sizes, gone peers, silence."""
    group = ThreadGroup(2, timeout_s=0.5)

    def rank_main(rank: int) -> str:
        if rank == 0:
            group.batch_isend_irecv([group.P2POp(group.isend, torch.zeros(3), 1)])
            return "sent"
        got = torch.empty(4)
        (work,) = group.batch_isend_irecv([group.P2POp(group.irecv, got, 0)])
        with pytest.raises(RuntimeError, match="message of 3 elements into a buffer of 4"):
            work.wait()
        (work,) = group.batch_isend_irecv([group.P2POp(group.irecv, got, 0)])
        with pytest.raises(RuntimeError, match="Connection closed by peer: rank 0"):
            work.wait()  # rank 0 returned without sending again
        with pytest.raises(RuntimeError, match="Connection closed by peer: rank 0"):
            group.batch_isend_irecv([group.P2POp(group.isend, got, 0)])
        return "refused"

    assert group.run(rank_main, monkeypatch) == {0: "sent", 1: "refused"}
    silent = ThreadGroup(2, timeout_s=0.3)

    def wait_for_silence(rank: int) -> None:
        if rank == 1:
            (work,) = silent.batch_isend_irecv([silent.P2POp(silent.irecv, torch.empty(1), 0)])
            work.wait()
        else:
            time.sleep(0.5)  # silent past rank 1's timeout, home before the run's limit (3 x 0.3 s)

    with pytest.raises(AssertionError, match=r"rank 1 of 2 raised RuntimeError: .*Timed out waiting 0.3 s for rank 0"):
        silent.run(wait_for_silence, monkeypatch)
