"""What bench and compare share: fresh-subprocess cases, timing, peak memory, results files.

Every benchmark is a command. A *case* is a function ``module:function`` taking keyword
arguments and returning a JSON-able dict; `run_case` runs it in a fresh Python process,
so peak memory of one case never leaks into the next, and returns its dict (or the
reason it failed: out of memory, timeout, exception). Inside a case, `peak_memory` and
`time_fn` do the measuring. `write_results` writes JSON plus a Markdown table with the
machine, the versions and the command in the folder ``--out`` names (the current directory by default).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(".")  # the committed results are written with --out docs/results


# ----------------------------------------------------------------- in the case
def _rss_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS`` now, ``VmHWM`` peak), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0: write 5 to clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any]) -> dict[str, int]:
    """Run ``fn`` once and return the peak resident memory it added, in bytes.

    The peak is the kernel's high-water mark (VmHWM), reset just before ``fn`` runs, minus
    the resident memory at that moment: what ``fn`` allocated at its worst, inputs excluded.
    On CUDA the allocator's peak is reported too.
    """
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    reset = _reset_peak()
    base = _rss_bytes("VmRSS")
    fn()
    peak = _rss_bytes("VmHWM")
    result = {"peak_bytes": max(0, peak - base), "base_rss_bytes": base, "peak_reset": reset}
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - cuda_base
    return result


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 3, max_seconds: float = 60.0) -> dict[str, Any]:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` (fewer if ``max_seconds`` runs out)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def time_alternating(functions: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median wall time of each function, run in turn ``repeat`` times after one warm-up each.

    Alternating in one process makes a change in the machine's load hit every function alike, so
    their ratios hold even when the absolute times do not.
    """
    for fn in functions.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeat):
        for name, fn in functions.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------ threads
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_count(explicit: int | None = None) -> tuple[int, str]:
    """``(threads, source)``: the torch intra-op threads a command should use, and where the number came from.

    ``explicit`` (a ``--threads`` option) first, then the user's ``OMP_NUM_THREADS``, then
    ``MKL_NUM_THREADS`` (the first value of a comma-separated OpenMP list), then torch's own
    default (one thread per physical core). A command sets it with ``torch.set_num_threads``
    and passes it on to the fresh processes of its cases, so a limit the user set holds everywhere.

    Raises:
        UsageError: a thread variable that is set is not a positive integer.
    """
    if explicit is not None:
        return int(explicit), "--threads"
    for name in THREAD_VARIABLES:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        first = value.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            from attnkit.apps.checks import UsageError

            raise UsageError(f"{name}={value!r} is not a positive integer; unset it or give --threads")
        return int(first), name
    import torch

    return torch.get_num_threads(), "torch's default"


def thread_env(threads: int) -> dict[str, str]:
    """The environment that holds a fresh process to ``threads`` threads (OpenMP and MKL alike)."""
    return {name: str(threads) for name in THREAD_VARIABLES}


# ------------------------------------------------------------ the fresh process
def _child(target: str, kwargs_json: str) -> None:
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    result = fn(**json.loads(kwargs_json))
    sys.stdout.write("\n@@RESULT@@" + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_case(target: str, kwargs: dict[str, Any], *, timeout: float = 600.0, env: dict | None = None) -> dict[str, Any]:
    """Run the case ``module:function(**kwargs)`` in a fresh Python process.

    Returns the case's dict, or ``{"error": reason}`` when it failed, was killed (for
    example by the out-of-memory killer) or ran past ``timeout`` seconds.
    """
    code = "import sys; from attnkit.apps.harness import _child; _child(sys.argv[1], sys.argv[2])"
    cmd = [sys.executable, "-c", code, target, json.dumps(kwargs)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    if proc.returncode < 0 or proc.returncode == 137:
        return {"error": f"killed by signal {-proc.returncode if proc.returncode < 0 else 9} (out of memory?)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:300]}"}


# ------------------------------------------------------------------ the machine
def machine_info() -> dict[str, Any]:
    """The machine, the versions and the load, recorded beside every result."""
    import numpy
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1) if mem else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import attnkit

        info["attnkit"] = attnkit.__version__
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, timeout=5
        ).stdout.strip()
        info["git_commit"] = commit or None
    except Exception:  # the version record must never fail a benchmark
        pass
    return info


def command_line() -> str:
    """The command that produced the results, as a user would retype it."""
    argv = sys.argv[:]
    if argv and argv[0].endswith("attnkit"):
        argv[0] = "attnkit"
    elif argv and argv[0].endswith(".py"):
        argv = ["python", "-m", _module_of(argv[0]), *argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def _module_of(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[parts.index("attnkit") :]) if "attnkit" in parts else path


# ------------------------------------------------------------------ the results
def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns`` given as ``(key, header)`` pairs."""

    def fmt(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    *,
    out_dir: str | Path = DEFAULT_OUT,
    title: str,
    notes: Iterable[str] = (),
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md``: rows, machine, versions, command, notes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    command = command_line()
    payload = {"name": name, "command": command, "machine": machine, "rows": list(rows), **(extra or {})}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md = [f"# {title}", "", f"Command: `{command}`", ""]
    md.append(
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}; "
        f"load average at the end {tuple(round(x, 2) for x in machine['load_average'])}; {machine['date']}."
    )
    md += ["", markdown_table(rows, columns), ""]
    md += [f"- {n}" for n in notes]
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(md).rstrip() + "\n")
    return json_path, md_path


def progress(iterable: Iterable, *, desc: str, total: int | None = None):
    """A tqdm progress bar on stderr (the benchmark's table goes to stdout)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
