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
import re
import time
import types
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

    group = ThreadGroup(2, timeout_s)

    def rank_main(rank: int) -> dict | None:
        if rank == 1:  # the faulty peer: gone at once (as a process that exited), or silent until rank 0 gave up
            while fault == "hangs" and 0 not in group.gone:
                time.sleep(0.01)
            return None
        x = torch.randn(1, 2, 4, 8)
        return timed_call(fn, x, x, x)

    check_fault(group.run(rank_main, monkeypatch)[0], fault, method, timeout_s)


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
            while 1 not in silent.gone:  # silent until rank 1 gave up
                time.sleep(0.01)

    with pytest.raises(AssertionError, match=r"rank 1 of 2 raised RuntimeError: .*Timed out waiting 0.3 s for rank 0"):
        silent.run(wait_for_silence, monkeypatch)


def _inputs(shape=(1, 2, 8, 8), dtype=torch.float64, seed=0) -> tuple[torch.Tensor, ...]:
    """Full-sequence q, k, v and an output gradient ``(B, H, L, D)``, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=dtype) for _ in range(4))


def _ring_shard(q, k, v, dout, rank, world, *, group=None, layout="zigzag", backward=True, **kw):
    """This rank's shard of ring attention's output and of the gradients of q, k, v (None without ``backward``)."""
    qs, ks, vs = (shard(x, rank, world, layout=layout).requires_grad_() for x in (q, k, v))
    out = ring_attention(qs, ks, vs, group=group, layout=layout, **kw)
    if backward:
        out.backward(shard(dout, rank, world, layout=layout))
    return out.detach(), qs.grad, ks.grad, vs.grad


def _reference_shard(q, k, v, dout, rank, world, *, layout="zigzag", **kw):
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    out = attnkit.attention(qr, kr, vr, backend="reference", **kw)
    out.backward(dout)
    return tuple(shard(t, rank, world, layout=layout) for t in (out.detach(), qr.grad, kr.grad, vr.grad))


def test_ranks_as_threads_on_sub_groups_use_their_group_ranks_and_global_peers(monkeypatch):
    """Two rings in a world of 4, on groups {3, 1} and {0, 2}: group ranks place the shards, global ranks the peers.

    In float64 the ring must match to 1e-12, so it also accumulates in float64 (``acc_dtype``).
    """
    world = ThreadGroup(4, timeout_s=5.0)
    pairs = [world.new_group([3, 1]), world.new_group([0, 2])]
    q, k, v, dout = _inputs()

    def rank_main(rank: int):
        group = pairs[0] if rank in (3, 1) else pairs[1]
        r = group.ranks.index(rank)
        got = _ring_shard(q, k, v, dout, r, 2, group=group, causal=True)
        want = _reference_shard(q, k, v, dout, r, 2, causal=True)
        return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))

    errors = world.run(rank_main, monkeypatch)
    assert sorted(errors) == [0, 1, 2, 3] and max(errors.values()) <= 1e-12, errors


def test_ranks_as_threads_make_every_tensor_on_the_inputs_device(monkeypatch):
    """Under a ``meta`` default device, a tensor made without ``device=`` lands on meta and the ring fails."""
    q, k, v, dout = _inputs(shape=(1, 2, 9, 8), dtype=torch.float32)

    def rank_main(rank: int):
        with torch.device("meta"):
            got = _ring_shard(q, k, v, dout, rank, 3, layout="contiguous", window=(3, 2))
        want = _reference_shard(q, k, v, dout, rank, 3, layout="contiguous", window=(3, 2))
        return max((g.double() - w).abs().max().item() for g, w in zip(got, want, strict=True))

    errors = ThreadGroup(3).run(rank_main, monkeypatch)
    assert max(errors.values()) <= 1e-5, errors


def test_ranks_as_threads_seq_len_and_shard_checks(monkeypatch):
    """The local checks, through a group of one: seq_len's bounds and type, equal q/k lengths, the layout."""
    x = torch.randn(1, 2, 4, 8)

    def rank_main(rank: int) -> None:
        out = ring_attention(x, x, x, seq_len=1)  # only the first key is real
        torch.testing.assert_close(out, x[:, :, :1].expand_as(out), atol=1e-6, rtol=0)
        for bad in (True, 2.5, 0, 5):
            with pytest.raises(ValueError, match=rf"ring_attention: seq_len must be an int in \[1, 4\] .*got {bad!r}"):
                ring_attention(x, x, x, seq_len=bad)
        want = (
            r"ring_attention: q and k shards must have the same length \(self-attention over one sequence\); "
            r"got q \(1, 2, 4, 8\), k \(1, 2, 6, 8\)"
        )
        with pytest.raises(ValueError, match=want):
            ring_attention(x, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
        with pytest.raises(ValueError, match=r"ring_attention: layout must be one of \('contiguous', 'zigzag'\)"):
            ring_attention(x, x, x, layout="striped")
        want = r"its length must be even; got 3 \(shard with attnkit.distributed.shard_sequence, which pads\)"
        with pytest.raises(ValueError, match=want):
            ring_attention(x[:, :, :3], x[:, :, :3], x[:, :, :3], layout="zigzag")

    ThreadGroup(1).run(rank_main, monkeypatch)
    monkeypatch.undo()  # no group at all
    with pytest.raises(RuntimeError, match=r"or use attnkit.attention in one process$"):
        ring_attention(x, x, x)


def test_ranks_as_threads_name_every_field_two_ranks_disagree_on(monkeypatch):
    """Two ranks of group {1, 0}, four fields apart: one line each, as passed (None, 0, bfloat16, negative slopes).

    The ranks are named by their rank in the group: global rank 1 is rank 0.
    """
    x = torch.randn(1, 2, 4, 8)
    y = x.to(torch.bfloat16)
    options = [
        dict(window=(None, 0)),
        dict(causal=True, window=(0, None), alibi=torch.tensor([-1.0, -0.5])),
    ]  # by group rank
    world = ThreadGroup(2)
    pair = world.new_group([1, 0])

    def rank_main(rank: int) -> str:
        r = pair.ranks.index(rank)
        t = y if r == 0 else x
        with pytest.raises(PeerError) as raised:
            ring_attention(t, t, t, group=pair, **options[r])
        return str(raised.value)

    for rank, err in world.run(rank_main, monkeypatch).items():
        head = (
            f"ring_attention: rank {pair.ranks.index(rank)} of 2: the ranks of the group disagree, so no rank computes "
            "(every rank must pass q, k and v shards of the same shapes and dtypes, and the same options):\n"
        )
        body = "".join(
            f"  {name} dtype: rank 0: torch.bfloat16; rank 1: torch.float32\n" for name in ("q", "k", "v")
        ) + ("  causal: rank 0: False; rank 1: True\n  window: rank 0: (None, 0); rank 1: (0, None)\n")
        crc = r"  alibi: rank 0: None; rank 1: slopes summing to -1\.5 \(crc32 [0-9a-f]{8}\)"
        assert re.fullmatch(re.escape(head + body) + crc, err), err


def test_ranks_as_threads_hear_which_peers_rejected_what(monkeypatch):
    """Ranks 1 and 2 reject their own arguments (a list, a 3-D tensor): each raises its own error, rank 0 hears both."""
    x = torch.randn(1, 2, 4, 8)
    q = [x, [[1.0]], x[0]]

    def rank_main(rank: int) -> str:
        return timed_call(ring_attention, q[rank], x, x)["error"]

    errors = ThreadGroup(3).run(rank_main, monkeypatch)
    assert errors[0] == (
        "PeerError: ring_attention: rank 0 of 3: ranks 1, 2 rejected their own arguments (TypeError, ValueError, "
        "raised there), so no rank computes"
    ), errors[0]
    assert errors[1].startswith("TypeError: ") and errors[2].startswith("ValueError: attention: q must be 4-D"), errors


def test_ranks_as_threads_of_another_version_say_so_before_anything_else(monkeypatch):
    """A peer with another descriptor protocol: the protocol line, even when a third rank rejected its arguments."""
    from attnkit.distributed import ring as peers

    describe = peers._describe
    group = ThreadGroup(3)

    def other_version_on_rank_2(*args):
        words = describe(*args)
        return [words[0] + 1, *words[1:]] if group.get_rank() == 2 else words

    monkeypatch.setattr(peers, "_describe", other_version_on_rank_2)
    assert describe("ring_attention", *[torch.randn(1, 2, 4, 8)] * 3, None, "zigzag", 8, ValueError())[0] == 1
    x = torch.randn(1, 2, 4, 8)
    errors = group.run(lambda rank: timed_call(ring_attention, x, x, x, seq_len=0 if rank == 1 else None), monkeypatch)
    assert errors[1]["error"].startswith("ValueError: ring_attention: seq_len must be"), errors[1]
    for rank in (0, 2):
        head = f"PeerError: ring_attention: rank {rank} of 3: the ranks of the group disagree"
        assert errors[rank]["error"].startswith(head), errors
        assert errors[rank]["error"].endswith(":\n  protocol: ranks 0, 1: 1; rank 2: 2"), errors[rank]


@pytest.mark.parametrize(
    ("post", "backward", "doing"),
    [
        (1, False, "waiting for the next key/value shard at step 0"),
        (2, True, "waiting for the next key/value shard at step 0"),
        (3, True, "waiting for the dK/dV accumulator at step 1"),
        (4, True, "waiting for this rank's finished dK/dV at step 2"),
    ],
    ids=["forward", "backward-next-kv", "backward-accumulator", "backward-finished"],
)
def test_ranks_as_threads_name_the_ring_step_a_silent_peer_stopped_at(monkeypatch, post, backward, doing):
    """Global rank 0 stops answering at its ``post``-th exchange; its partner in group {2, 0} names what it waited for.

    Forward posts once (world 2); backward posts the next K/V, then the dK/dV accumulator twice.
    """
    world = ThreadGroup(3, silent={0: post})
    pair = world.new_group([2, 0], timeout=datetime.timedelta(seconds=0.5))
    q, k, v, dout = _inputs(dtype=torch.float32)

    def rank_main(rank: int):
        if rank == 1:
            return None  # not in the pair
        return timed_call(_ring_shard, q, k, v, dout, pair.ranks.index(rank), 2, group=pair, backward=backward)

    got = world.run(rank_main, monkeypatch)[2]
    want = (
        f"PeerError: ring_attention: rank 0 of 2 failed {doing} (receiving from global rank 0, sending to 0): a peer "
        "likely failed or mismatched (it died, hangs, gave up after an error of its own, or passed other shapes). "
        "Process-group timeout: 0.5 s. Cause: [thread group] Timed out waiting 0.5 s for rank 0"
    )
    assert got["error"].startswith(want) and got["cause"][0] == "RuntimeError", got


def test_ranks_as_threads_name_the_exchange_a_gone_peer_refused(monkeypatch):
    """Global rank 0 ends after the forward; its partner in group {2, 0} cannot post its backward to it."""
    world = ThreadGroup(3)
    pair = world.new_group([2, 0], timeout=datetime.timedelta(seconds=4))
    q, k, v, dout = _inputs(dtype=torch.float32)

    def rank_main(rank: int):
        if rank == 1:
            return None  # not in the pair
        r = pair.ranks.index(rank)
        qs, ks, vs = (shard(x, r, 2, layout="zigzag").requires_grad_() for x in (q, k, v))
        out = ring_attention(qs, ks, vs, group=pair, layout="zigzag")
        if rank == 0:
            return None
        while 0 not in world.gone:
            time.sleep(0.01)
        return timed_call(out.backward, shard(dout, r, 2, layout="zigzag"))

    got = world.run(rank_main, monkeypatch)[2]
    want = (
        "PeerError: ring_attention: rank 0 of 2 failed posting a ring exchange (receiving from global rank 0, "
        "sending to 0): a peer likely failed or mismatched (it died, hangs, gave up after an error of its own, or "
        "passed other shapes). Process-group timeout: 4 s. Cause: [thread group] Connection closed by peer: rank 0"
    )
    assert got["error"].startswith(want), got


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_ranks_as_threads_report_their_sub_groups_timeout(monkeypatch, method):
    """The survivor of a pair whose peer never calls: the pair's timeout (0.5 s), not the default group's (20 s)."""
    world = ThreadGroup(4, timeout_s=20.0)
    pairs = [world.new_group(p, timeout=datetime.timedelta(seconds=0.5)) for p in ([0, 1], [2, 3])]
    fn = ring_attention if method == "ring" else ulysses_attention

    def rank_main(rank: int):
        if rank % 2 == 1:
            while len(world.gone) < 2:  # hangs until both survivors gave up
                time.sleep(0.01)
            return None
        x = torch.randn(1, 2, 4, 8)
        return timed_call(fn, x, x, x, group=pairs[rank // 2])

    results = world.run(rank_main, monkeypatch)
    for rank in (0, 2):
        want = (
            f"PeerError: {method}_attention: rank 0 of 2 failed exchanging argument descriptors (before any data "
            "moved): a peer likely failed or mismatched (it died, hangs, gave up after an error of its own, or passed "
            "other shapes). Process-group timeout: 0.5 s. Cause: [thread group] Timed out waiting 0.5 s for rank "
            f"{rank + 1}"
        )
        assert results[rank]["error"].startswith(want), results[rank]


def test_group_timeout_and_descriptor_device_follow_the_groups_backend(monkeypatch):
    """gloo groups serve the CPU, NCCL groups CUDA; the descriptor travels where the group can send it."""
    from attnkit.distributed import ring as peers

    world = ThreadGroup(1, timeout_s=7.0)
    monkeypatch.setattr(peers, "dist", world)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seconds = datetime.timedelta(seconds=3)
    assert peers.group_timeout(None) == "7 s"
    assert peers.group_timeout(world.new_group([0], timeout=seconds)) == "3 s"
    assert peers.group_timeout(world.new_group([0], timeout=seconds, backend="nccl")) == "3 s"
    assert peers.group_timeout(types.SimpleNamespace()) == "the timeout given to init_process_group"
    q = torch.randn(1, 2, 4, 8)
    for backend, device in (("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("nccl", "cuda:0")):
        assert peers._descriptor_device(world.new_group([0], backend=backend), q) == torch.device(device), backend
