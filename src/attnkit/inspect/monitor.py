"""`Monitor`: watch the heads of a model while it trains, with the time and memory attention costs.

Every ``every`` steps, for the batch of that step, per layer and head:

* ``entropy`` (nats), ``mean_distance`` and the head ``role`` of `attnkit.inspect.head_roles`, from
  the statistics pass `attnkit.attention_stats`; ``sink_share`` (attention to the first token),
  ``exp(s_i0 - lse_i)`` from the pass's log-sum-exp;
* ``near_share`` (attention within ``near`` = 8 tokens) and ``far_share`` (beyond ``far`` = 256
  tokens), from `attnkit.inspect.bands.band_shares`, exact over row strips;
* ``reach``: ``"local"`` when ``near_share >= 0.5``, ``"long-range"`` when ``far_share >= 0.5``,
  else ``"middle"`` (`REACH_THRESHOLD`).

Every figure but ``role`` is a mean over the (sequence, query) pairs of the batch that have an
allowed key (or those of ``focus``, see `Monitor.step`). No map of ``Lq x Lk`` weights is ever
held. Per monitored step it also measures:

* ``attention_forward_ms`` / ``attention_backward_ms``: time in the model's attention calls. The
  forward is timed around each call (`attnkit.hooks`); the backward from the moment the gradient
  of a call's output is ready to the moment that of its ``q`` is. On CUDA these are CUDA-event
  times on the current stream; on the CPU, wall time.
* ``step_ms``: from the start of the step (the end of the previous one) to `Monitor.step`.
* ``peak_memory_mib`` and ``memory_source``: on CUDA, ``torch.cuda.max_memory_allocated`` over the
  step (``"cuda_max_allocated"``); on Linux CPUs, the process's peak resident set size over the
  step, reset at its start through ``/proc/self/clear_refs`` (``"rss_peak"``, the whole process:
  the model, the optimizer, Python); where that reset is refused, the peak since the process
  started (``"rss_peak_since_start"``). The statistics are computed after these readings.
  The reset is process-wide: another reader of ``VmHWM`` in the same process (a benchmark's
  peak-memory probe) sees its peak reset at each monitored step.

Three ways to attach it::

    # 1. a hand-written loop: hooks run while the monitor is open
    with Monitor(model, every=100, logdir="runs/monitor") as monitor:
        for batch in loader:
            loss = loss_fn(model(batch))
            loss.backward(); opt.step(); opt.zero_grad()
            monitor.step()

    # 2. a probe: without `with`, step(batch) runs one extra no-grad forward every `every` steps
    monitor = Monitor(model, every=100, logdir="runs/monitor")
    for batch in loader:
        ...
        monitor.step(batch)

    # 3. transformers.Trainer
    trainer = Trainer(model, args, callbacks=[Monitor(model, logdir="runs/monitor").trainer_callback()])

Output: ``heads.csv`` (one row per step, layer and head), ``steps.csv`` (one row per monitored
step) and TensorBoard events under ``logdir``; `Monitor.history` holds the same rows.
`attnkit monitor-report LOGDIR` draws how the roles evolved.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import hooks
from attnkit.inspect.bands import band_shares, first_key_weight
from attnkit.inspect.record import record
from attnkit.inspect.roles import head_roles
from attnkit.options import AttentionOptions
from attnkit.stats import attention_stats

__all__ = ["HEAD_COLUMNS", "REACH_THRESHOLD", "STEP_COLUMNS", "Monitor", "reach"]

log = logging.getLogger(__name__)

REACH_THRESHOLD = 0.5  # a head is "local" / "long-range" when at least half its attention is in that band

HEAD_COLUMNS = (
    "step", "layer", "head", "role", "reach", "entropy", "mean_distance", "near_share", "far_share", "sink_share",
)  # fmt: skip
STEP_COLUMNS = (
    "step", "step_ms", "attention_forward_ms", "attention_backward_ms", "attention_ms", "peak_memory_mib",
    "memory_source", "monitor_ms", "batch", "length",
)  # fmt: skip


def reach(near_share: float, far_share: float, threshold: float = REACH_THRESHOLD) -> str:
    """``"local"``, ``"long-range"`` or ``"middle"`` from a head's near and far shares."""
    if near_share >= threshold:
        return "local"
    if far_share >= threshold:
        return "long-range"
    return "middle"


# ------------------------------------------------------------------------ time and memory
class _Clock:
    """Marks in time: ``perf_counter`` on the CPU, CUDA events on the current stream on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (on CUDA, call after `sync`)."""
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class _PeakMemory:
    """The peak memory of a stretch of work: reset at its start, read at its end."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.resettable = False
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak RSS (Linux >= 4.0)
                f.write("5")
            self.resettable = True

    def read(self) -> tuple[float, str]:
        """``(MiB, source)``; see the module docstring for the sources."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        if getattr(self, "resettable", False):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024, "rss_peak"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**20 if sys.platform == "darwin" else 1024), "rss_peak_since_start"


# ------------------------------------------------------------------------ one monitored step
@dataclass
class _Layer:
    """What the hook kept of one attention module during a monitored step."""

    q: Tensor  # (B, Hq, Lq, D), detached: the first call of the step
    k: Tensor  # (B, Hk, Lk, D)
    v: Tensor  # (B, Hk, Lk, Dv)
    options: AttentionOptions
    forward: list[tuple[Any, Any]] = field(default_factory=list)  # (start, end) marks of every call
    backward: list[list[Any]] = field(default_factory=list)  # [start, end] marks, end None until reached


@dataclass
class _Window:
    """The hooks and records of one monitored step."""

    stack: contextlib.ExitStack
    start: Any
    memory: _PeakMemory
    layers: dict[str, _Layer] = field(default_factory=dict)
    tokens: Tensor | None = None


class Monitor:
    """Log per-head attention patterns, attention time and peak memory every ``every`` steps.

    Args:
        model: an `nn.Module` whose attention runs through attnkit: `attnkit.nn` modules, or a
            ``transformers`` model (switched to the ``"attnkit"`` attention implementation during
            monitored steps, as `attnkit.inspect.record` does; its outputs do not change).
        every: monitor steps ``0, every, 2 * every, ...`` (>= 1).
        logdir: folder for ``heads.csv``, ``steps.csv`` and TensorBoard events; None keeps the rows
            in `history` only.
        tensorboard: also write TensorBoard events (needs ``pip install attnkit[monitor]``).
        near: ``near_share`` is the attention within ``|i' - j| <= near``.
        far: ``far_share`` is the attention beyond ``|i' - j| > far``.
        roles: overrides of `attnkit.inspect.THRESHOLDS` for the ``role`` label.

    Attributes:
        history: one dict per (monitored step, layer, head), keys `HEAD_COLUMNS`.
        steps: one dict per monitored step, keys `STEP_COLUMNS`.
        step_count: the number of steps finished (the index of the coming step).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 100,
        logdir: str | os.PathLike | None = None,
        tensorboard: bool = True,
        near: int = 8,
        far: int = 256,
        roles: dict[str, float] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Monitor: every must be an int >= 1, got {every!r}")
        if isinstance(near, bool) or not isinstance(near, int) or near < 0:
            raise ValueError(f"Monitor: near must be an int >= 0, got {near!r}")
        if isinstance(far, bool) or not isinstance(far, int) or far < near:
            raise ValueError(f"Monitor: far must be an int >= near ({near}), got {far!r}")
        self.model, self.every, self.near, self.far, self.roles = model, every, near, far, roles
        self.logdir = None if logdir is None else Path(logdir)
        self.history: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.step_count = 0
        self._names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
        self._window: _Window | None = None
        self._attached = False
        self._auto_arm = True  # arm the next step at the end of this one (off for the Trainer callback)
        self._writer = None
        self._csv: dict[str, tuple[Any, csv.DictWriter]] = {}
        if self.logdir is not None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self._writer = _summary_writer(self.logdir)

    # ----------------------------------------------------------------- attaching
    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> Monitor:
        """Attach: from now on the monitored steps are watched through the model's own forward."""
        self._attached = True
        self.begin_step()
        return self

    def close(self) -> None:
        """Detach, drop an unfinished step's records and close the log files."""
        self._attached = False
        if self._window is not None:
            self._window.stack.close()
            self._window = None
        for handle, _ in self._csv.values():
            handle.close()
        self._csv = {}
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def due(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the coming one) is monitored."""
        return (self.step_count if step is None else step) % self.every == 0

    def begin_step(self) -> None:
        """Start watching the coming step if it is a monitored one (`step` calls it for the next step)."""
        if self._window is not None or not self.due():
            return
        device = _device_of(self.model)
        memory = _PeakMemory(device)
        memory.reset()
        stack = contextlib.ExitStack()
        window = _Window(stack=stack, start=_Clock(device).mark(), memory=memory)
        stack.enter_context(record(self.model, stats=False))  # checks the model; switches transformers models
        stack.enter_context(hooks.attention_hook(self._hook))
        stack.callback(self.model.register_forward_pre_hook(self._keep_tokens, with_kwargs=True).remove)
        self._window = window

    def step(self, batch: Any = None, *, focus: Tensor | None = None) -> dict[str, Any] | None:
        """End a training step; on a monitored step, compute and log its figures.

        Args:
            batch: optional. When the monitor is not attached (no ``with`` / `start`), the model
                runs on it once under ``torch.no_grad`` on monitored steps (a dict is passed as
                keyword arguments). A ``(B, L)`` integer tensor (or a dict's ``input_ids``) also
                gives the tokens for the token-based role scores (duplicate-token, induction).
            focus: optional bool ``(B, Lq)``: describe only these queries (e.g. the positions the loss
                scores), instead of every query that has an allowed key. Applies to every figure but
                ``role``, which `head_roles` gives over all queries.

        Returns:
            the step's row of `steps` on a monitored step, else None.
        """
        row = None
        if self._window is None and not self._attached and batch is not None and self.due():
            self.begin_step()
            try:
                with torch.no_grad():
                    self.model(**batch) if isinstance(batch, dict) else self.model(batch)
            except BaseException:
                self._window.stack.close()  # remove the hooks before the error goes up
                self._window = None
                raise
        window, self._window = self._window, None
        if window is not None:
            row = self._finish(window, _tokens_of(batch), focus)
        self.step_count += 1
        if self._attached and self._auto_arm:
            self.begin_step()
        return row

    def trainer_callback(self):
        """A ``transformers.TrainerCallback`` driving this monitor (needs ``pip install attnkit[hf]``)."""
        try:
            from transformers import TrainerCallback
        except ImportError as e:
            raise ImportError("Monitor.trainer_callback needs transformers: pip install 'attnkit[hf]'") from e
        return _make_callback(TrainerCallback, self)

    # ----------------------------------------------------------------- the hooks
    def _keep_tokens(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        window = self._window
        if window is not None and window.tokens is None:
            window.tokens = _tokens_of(kwargs.get("input_ids", args[0] if args else None))

    def _hook(self, call: hooks.AttentionCall, proceed: hooks.Proceed) -> Any:
        window = self._window
        name = None if call.caller is None else self._names.get(id(call.caller))
        if window is None or name is None:
            return proceed(call)  # a bare call (the library's own), or another model's
        clock = _Clock(call.q.device)
        start = clock.mark()
        result = proceed(call)
        end = clock.mark()
        layer = window.layers.get(name)
        if layer is None:
            layer = window.layers[name] = _Layer(call.q.detach(), call.k.detach(), call.v.detach(), call.options)
        layer.forward.append((start, end))
        out = result[0] if call.return_lse else result
        if out.requires_grad and call.q.requires_grad:
            marks: list[Any] = [None, None]
            layer.backward.append(marks)
            out.register_hook(_marker(marks, 0, clock))
            call.q.register_hook(_marker(marks, 1, clock))
        return result

    # ----------------------------------------------------------------- the figures
    def _finish(self, window: _Window, tokens: Tensor | None, focus: Tensor | None) -> dict[str, Any]:
        device = _device_of(self.model)
        clock = _Clock(device)
        end = clock.mark()
        window.stack.close()
        clock.sync()
        peak_mib, source = window.memory.read()
        step_s = clock.seconds(window.start, end)
        began = time.perf_counter()
        step = self.step_count
        if not window.layers:
            log.warning("Monitor: step %d saw no attention call of the model; nothing to log", step)
        fwd = sum(clock.seconds(a, b) for layer in window.layers.values() for a, b in layer.forward)
        bwd = sum(
            clock.seconds(a, b) for layer in window.layers.values() for a, b in layer.backward if None not in (a, b)
        )
        rows = self._head_rows(step, window.layers, tokens if tokens is not None else window.tokens, focus)
        first = next(iter(window.layers.values()), None)
        summary = {
            "step": step, "step_ms": 1e3 * step_s, "attention_forward_ms": 1e3 * fwd,
            "attention_backward_ms": 1e3 * bwd, "attention_ms": 1e3 * (fwd + bwd), "peak_memory_mib": peak_mib,
            "memory_source": source, "monitor_ms": 1e3 * (time.perf_counter() - began),
            "batch": None if first is None else first.q.shape[0], "length": None if first is None else first.q.shape[2],
        }  # fmt: skip
        self.history.extend(rows)
        self.steps.append(summary)
        self._log(step, rows, summary)
        return summary

    def _head_rows(
        self, step: int, layers: dict[str, _Layer], tokens: Tensor | None, focus: Tensor | None
    ) -> list[dict[str, Any]]:
        """One row per head of every layer (statistics pass, distance bands, roles)."""
        rows = []
        for name, layer in layers.items():
            kwargs = layer.options.kwargs(dropout=False)
            st = attention_stats(layer.q, layer.k, layer.v, **kwargs, topk=8, pool=1)
            B, _, Lq, Lk = st.shape
            toks = tokens if tokens is not None and tuple(tokens.shape) == (B, Lk) else None
            roles = head_roles(st, tokens=None if toks is None else toks.cpu(), thresholds=self.roles).rows
            near, far, valid = band_shares(layer.q, layer.k, layer.options, near=self.near, far=self.far)
            per_row = {
                "entropy": st.entropy, "mean_distance": st.mean_distance, "near_share": near, "far_share": far,
                "sink_share": first_key_weight(layer.q, layer.k, st.lse, layer.options),
            }  # fmt: skip
            if focus is not None:
                if tuple(focus.shape) != (B, Lq):
                    raise ValueError(
                        f"Monitor.step: focus must be a bool (B, Lq) = ({B}, {Lq}) mask of the queries to "
                        f"describe (layer {name}), got shape {tuple(focus.shape)}"
                    )
                valid = valid & focus.to(valid.device, torch.bool)[:, None, :]  # (B, H, Lq)
            weight = valid.to(near.dtype)
            count = weight.sum((0, 2))  # (H,): described rows
            means = {key: ((x.to(near.dtype) * weight).sum((0, 2)) / count.clamp(min=1)).tolist()
                     for key, x in per_row.items()}  # fmt: skip
            for h, scored in enumerate(roles):
                figures = {key: math.nan if count[h] == 0 else m[h] for key, m in means.items()}
                rows.append(
                    {
                        "step": step, "layer": name, "head": h, "role": scored["role"],
                        "reach": "none" if count[h] == 0 else reach(figures["near_share"], figures["far_share"]),
                        **figures,
                    }
                )  # fmt: skip
        return rows

    def _log(self, step: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        if self.logdir is None:
            return
        self._append("heads", HEAD_COLUMNS, rows)
        self._append("steps", STEP_COLUMNS, [summary])
        writer = self._writer
        if writer is None:
            return
        for r in rows:
            for key in ("entropy", "mean_distance", "near_share", "far_share", "sink_share"):
                writer.add_scalar(f"{key}/{r['layer']}/head{r['head']}", r[key], step)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["reach"]] = counts.get(r["reach"], 0) + 1
            counts[r["role"]] = counts.get(r["role"], 0) + 1
        for label, n in counts.items():
            writer.add_scalar(f"heads_with/{label}", n, step)
        for key in ("step_ms", "attention_forward_ms", "attention_backward_ms", "attention_ms", "peak_memory_mib"):
            writer.add_scalar(f"speed_memory/{key}", summary[key], step)
        writer.add_text("roles", _roles_table(rows), step)
        writer.flush()

    def _append(self, name: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
        if name not in self._csv:
            handle = open(self.logdir / f"{name}.csv", "w", newline="")  # noqa: SIM115 - kept open across steps
            out = csv.DictWriter(handle, fieldnames=columns)
            out.writeheader()
            self._csv[name] = (handle, out)
        handle, out = self._csv[name]
        out.writerows(rows)
        handle.flush()


# ------------------------------------------------------------------------ helpers
def _summary_writer(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "Monitor: TensorBoard logging needs tensorboard: pip install 'attnkit[monitor]' (or pass tensorboard=False)"
        ) from e
    return SummaryWriter(log_dir=str(logdir))


def _marker(marks: list[Any], index: int, clock: _Clock) -> Callable[[Tensor], None]:
    """A tensor hook that marks the time its gradient is ready (the first time only)."""

    def mark(grad: Tensor) -> None:
        if marks[index] is None:
            marks[index] = clock.mark()

    return mark


def _tokens_of(batch: Any) -> Tensor | None:
    """``(B, L)`` integer token ids found in a batch (a tensor, or a dict's ``input_ids``), else None."""
    if isinstance(batch, dict):
        batch = batch.get("input_ids")
    if isinstance(batch, Tensor) and batch.dim() == 2 and not batch.is_floating_point() and batch.dtype != torch.bool:
        return batch.detach()
    return None


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def _roles_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of every head's role and reach (TensorBoard's text tab)."""
    lines = ["| layer | head | role | reach | near | far | sink |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['head']} | {r['role']} | {r['reach']} | {r['near_share']:.2f} | "
            f"{r['far_share']:.2f} | {r['sink_share']:.2f} |"
        )
    return "\n".join(lines)


def _make_callback(base: type, monitor: Monitor):
    """A ``TrainerCallback`` subclass instance that drives ``monitor`` (``base``: the transformers class)."""

    class MonitorCallback(base):
        """Watch the monitored optimizer steps of a ``transformers.Trainer`` (all their micro-batches)."""

        def on_train_begin(self, args, state, control, **kwargs):
            monitor._attached, monitor._auto_arm = True, False

        def on_step_begin(self, args, state, control, **kwargs):
            monitor.step_count = state.global_step
            monitor.begin_step()

        def on_step_end(self, args, state, control, **kwargs):
            monitor.step()

        def on_train_end(self, args, state, control, **kwargs):
            monitor.close()

    return MonitorCallback()
