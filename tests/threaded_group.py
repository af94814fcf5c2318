"""A process group of threads: the ``torch.distributed`` calls of ring and Ulysses attention, in one process.

tests/test_distributed.py runs ring and Ulysses attention over gloo in worker processes, which
costs seconds to start and minutes to run every case; a mutation run cannot afford that per
mutant, and a group of one never sends a message. torch's own threaded test group
(``torch.testing._internal.distributed.multi_threaded_pg``) has no point-to-point operations,
which the ring is made of. So this module stands in for the few calls attnkit makes
(``batch_isend_irecv`` of ``P2POp``\\s, ``all_gather``, ``all_to_all_single``, the rank and
world queries and the group's timeout), with gloo's semantics where the library depends on them:

* messages between a pair of ranks with the same tag arrive in the order they were sent, and a
  receive copies into the caller's buffer, which must have the sent message's size;
* posting a send to a rank that has gone (its thread returned or raised) raises
  ``RuntimeError`` at once, and so does waiting for a message that a gone rank never sent:
  gloo's "Connection closed by peer";
* a wait for a rank that is alive but silent raises ``RuntimeError`` after the group's timeout,
  which the group reports where ``attnkit.distributed.ring.group_timeout`` looks for it;
* a message's tag must be an int, as torch's binding requires;
* sub-groups (`ThreadGroup.new_group`) have their own ranks, timeout and messages: a receive
  posted on one group never matches a send on another, and ``P2POp`` peers are global ranks;
* a group knows its backend's devices, so a timeout looked up for a device the group does not
  serve fails as gloo's does.

``ThreadGroup(world).run(fn, monkeypatch)`` patches the ``dist`` of ``attnkit.distributed.ring``
and ``attnkit.distributed.ulysses`` for the call and runs ``fn(rank)`` on ``world`` threads.
``silent={rank: n}`` makes that rank hang at its ``n``-th ``batch_isend_irecv`` (until its peers
have given up), so a test can choose the step at which a peer stops answering.
CPU autograd runs a backward on the thread that called it, so each rank's backward sees its own
rank. Sharding through a group and ``context_parallel`` import ``torch.distributed`` elsewhere
and stay with the process suites.
"""

from __future__ import annotations

import dataclasses
import datetime
import queue
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from attnkit.distributed import ring, ulysses

_POLL_S = 0.02  # how often a waiting receive looks whether its sender has gone


def isend(*args, **kwargs):
    """The ``op`` of a `P2POp` that sends (never called: `ThreadGroup.batch_isend_irecv` posts it)."""
    raise NotImplementedError("post sends with batch_isend_irecv")


def irecv(*args, **kwargs):
    """The ``op`` of a `P2POp` that receives."""
    raise NotImplementedError("post receives with batch_isend_irecv")


@dataclasses.dataclass
class P2POp:
    """``torch.distributed.P2POp``: one send or receive of ``tensor`` to or from ``peer``."""

    op: Callable
    tensor: torch.Tensor
    peer: int
    group: Any = None
    tag: int = 0


class _Handle:
    """A group (``dist.group.WORLD`` or `ThreadGroup.new_group`'s): its global ranks, backend and timeout."""

    def __init__(self, ranks: list[int], timeout_s: float, backend: str = "gloo") -> None:
        self.ranks, self.timeout_s, self.backend = list(ranks), timeout_s, backend
        self._options = types.SimpleNamespace(_timeout=datetime.timedelta(seconds=timeout_s))

    def _get_backend(self, device: torch.device):
        """Where ``attnkit.distributed.ring.group_timeout`` finds the timeout: gloo serves the CPU, NCCL CUDA."""
        if torch.device(device).type != ("cuda" if self.backend == "nccl" else "cpu"):
            raise RuntimeError(f"[thread group] no backend for {device} in a {self.backend} group")
        return types.SimpleNamespace(options=self._options)


class _Silenced(BaseException):
    """Ends a rank that `ThreadGroup`'s ``silent`` made hang, once its peers have given up."""


class _Sent:
    def wait(self) -> bool:
        return True  # the message was copied when posted


class _Received:
    def __init__(self, world: ThreadGroup, group: _Handle, src: int, tag: Any, into: torch.Tensor) -> None:
        self.world, self.group, self.src, self.tag, self.into = world, group, src, tag, into

    def wait(self) -> bool:
        self.into.copy_(self.world._take(self.group, self.src, self.tag, self.into))
        return True


class _Counter:
    """Bytes this rank posts in sends and all-to-alls between ``start`` and `stop` (as the process suites count)."""

    def __init__(self, group: ThreadGroup) -> None:
        self.group, self.rank = group, group.get_rank()
        self.bytes, self._start = 0, group.sent[self.rank]

    def stop(self) -> None:
        self.bytes = self.group.sent[self.rank] - self._start


class ThreadGroup:
    """``world`` ranks, one thread each; an instance is what ``torch.distributed`` is to the patched modules."""

    ProcessGroup = _Handle
    P2POp = P2POp
    isend, irecv = staticmethod(isend), staticmethod(irecv)

    def __init__(self, world: int, timeout_s: float = 20.0, *, silent: dict[int, int] | None = None) -> None:
        self.world, self.timeout_s = world, timeout_s
        self.group = types.SimpleNamespace(WORLD=_Handle(list(range(world)), timeout_s))
        self.sent = [0] * world  # bytes posted by each rank (sends and all-to-alls; not all_gather)
        self.gone: set[int] = set()  # ranks whose thread has returned or raised
        self.silent = dict(silent or {})  # rank -> the batch_isend_irecv call (1-based) at which it hangs
        self._posts = [0] * world
        self._local = threading.local()
        self._boxes: dict[tuple[int, int, int, Any], queue.Queue] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ torch.distributed
    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def new_group(self, ranks: list[int], timeout: datetime.timedelta | None = None, backend: str = "gloo"):
        """A sub-group of global ``ranks`` (every rank may create it, as with torch)."""
        timeout_s = self.timeout_s if timeout is None else timeout.total_seconds()
        return _Handle(ranks, timeout_s, backend)

    def get_rank(self, group=None) -> int:
        """The caller's rank in ``group`` (-1 if not a member, as torch returns)."""
        ranks = self._group(group).ranks
        return ranks.index(self._me) if self._me in ranks else -1

    def get_world_size(self, group=None) -> int:
        return len(self._group(group).ranks)

    def get_global_rank(self, group, rank: int) -> int:
        return self._group(group).ranks[rank]

    def get_backend(self, group=None) -> str:
        return self._group(group).backend

    def batch_isend_irecv(self, ops: list[P2POp]) -> list:
        self._posts[self._me] += 1
        if self.silent.get(self._me) == self._posts[self._me]:
            self._hang()
        works = []
        for op in ops:
            if not isinstance(op.tag, int):  # torch's binding takes an int tag
                raise TypeError(f"[thread group] a message's tag must be an int, got {op.tag!r}")
            group = self._group(op.group)
            if op.op is isend:
                self._post(group, op.peer, op.tag, op.tensor)
                self.sent[self._me] += op.tensor.numel() * op.tensor.element_size()
                works.append(_Sent())
            elif op.op is irecv:
                works.append(_Received(self, group, op.peer, op.tag, op.tensor))
            else:
                raise ValueError(f"P2POp.op must be isend or irecv, got {op.op!r}")
        return works

    def all_gather(self, rows: list[torch.Tensor], tensor: torch.Tensor, group=None) -> None:
        group = self._group(group)
        for peer in group.ranks:
            if peer != self._me:
                self._post(group, peer, "all_gather", tensor)
        for peer, row in zip(group.ranks, rows, strict=True):
            row.copy_(tensor if peer == self._me else self._take(group, peer, "all_gather", row))

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, group=None) -> None:
        """Equal splits along dim 0 (the only form attnkit uses): chunk ``j`` of ``input`` goes to rank ``j``."""
        group = self._group(group)
        size, me = len(group.ranks), group.ranks.index(self._me)
        if input.shape[0] % size:
            raise RuntimeError(f"all_to_all_single: dim 0 ({input.shape[0]}) does not split into {size}")
        chunks, outs = input.chunk(size), output.chunk(size)
        for j, peer in enumerate(group.ranks):
            if peer != self._me:
                self._post(group, peer, "all_to_all", chunks[j])
                self.sent[self._me] += chunks[j].numel() * chunks[j].element_size()
        for j, peer in enumerate(group.ranks):
            outs[j].copy_(chunks[me] if peer == self._me else self._take(group, peer, "all_to_all", outs[j]))

    # ------------------------------------------------------------------ the mail
    @property
    def _me(self) -> int:
        return self._local.rank  # the caller's global rank

    def _group(self, group) -> _Handle:
        return self.group.WORLD if group is None else group

    def _box(self, group: _Handle, src: int, dst: int, tag: Any) -> queue.Queue:
        with self._lock:
            return self._boxes.setdefault((id(group), src, dst, tag), queue.Queue())

    def _post(self, group: _Handle, dst: int, tag: Any, tensor: torch.Tensor) -> None:
        if dst in self.gone:
            raise RuntimeError(f"[thread group] Connection closed by peer: rank {dst} has gone")
        self._box(group, self._me, dst, tag).put(tensor.detach().clone())

    def _take(self, group: _Handle, src: int, tag: Any, like: torch.Tensor) -> torch.Tensor:
        """The next message from ``src`` on ``group`` with ``tag``; it must have ``like``'s number of elements."""
        box, deadline = self._box(group, src, self._me, tag), time.monotonic() + group.timeout_s
        while True:
            try:
                msg = box.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if src in self.gone and box.empty():
                    raise RuntimeError(f"[thread group] Connection closed by peer: rank {src} has gone") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"[thread group] Timed out waiting {group.timeout_s:g} s for rank {src} (tag {tag!r})"
                    ) from None
        if msg.numel() != like.numel():
            raise RuntimeError(f"[thread group] message of {msg.numel()} elements into a buffer of {like.numel()}")
        return msg.view(like.shape)

    def _hang(self) -> None:
        """Stop answering: wait (alive, silent) until every other rank has gone, then end this rank."""
        while len(self.gone | {self._me}) < self.world:
            time.sleep(_POLL_S)
        raise _Silenced

    # --------------------------------------------------------------- the threads
    def counter(self) -> _Counter:
        """What tests/test_distributed.py's byte counter is, for the calling rank."""
        return _Counter(self)

    def run(self, fn: Callable[[int], Any], monkeypatch, *, limit_s: float | None = None) -> dict[int, Any]:
        """``{rank: fn(rank)}``, each on its own thread, with this group as ring's and Ulysses' ``dist``.

        A rank that raises is gone for its peers from then on (as a process that died); the
        first such error is raised here once every thread has ended. ``limit_s`` (default: three
        group timeouts) bounds the whole run.
        """
        self._posts = [0] * self.world
        monkeypatch.setattr(ring, "dist", self)
        monkeypatch.setattr(ulysses, "dist", self)
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}

        def main(rank: int) -> None:
            self._local.rank = rank
            try:
                results[rank] = fn(rank)
            except _Silenced:
                results[rank] = None
            except BaseException as e:  # reported below, with the rank
                errors[rank] = e
            finally:
                self.gone.add(rank)

        threads = [threading.Thread(target=main, args=(r,), name=f"rank{r}", daemon=True) for r in range(self.world)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + (3 * self.timeout_s if limit_s is None else limit_s)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise AssertionError(f"threads still running after the run's limit: {alive}")
        if errors:
            rank, error = min(errors.items())
            raise AssertionError(f"rank {rank} of {self.world} raised {type(error).__name__}: {error}") from error
        return results
