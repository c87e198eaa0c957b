"""Where and how a benchmark result was taken: the command, the machine, the load and the date.

Every result file in ``bench/results/`` starts with :func:`header` and ends with :func:`load_line`, so a
reader can re-run the command and judge the figures against the load they were taken under.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

__all__ = ["cpu_model", "gpu_names", "header", "load_line", "machine", "write_result"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """Names of the visible CUDA GPUs (empty without CUDA or without torch)."""
    try:
        import torch  # optional here: the provenance of a CPU-only result needs no torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine() -> str:
    """One line: CPU model and cores, memory, GPUs, Python and torch versions."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    gpus = gpu_names()
    try:
        import torch  # optional, as above

        torch_v = torch.__version__
    except ImportError:
        torch_v = "not installed"
    return (f"{cpu_model()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, "
            f"GPU: {', '.join(gpus) if gpus else 'none'}; Python {platform.python_version()}, torch {torch_v}")


def load_line(when: str = "now") -> str:
    """The 1/5/15-minute load averages and what they mean on this machine's cores."""
    la = os.getloadavg()
    cores = os.cpu_count() or 1
    note = (" (more runnable processes than cores: figures are taken under load, wall-clock rates are noisy)"
            if la[0] > cores else "")
    return f"Load average {when}: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {cores} cores{note}."


def header(title: str, argv: list[str] | None = None) -> list[str]:
    """The first lines of a result file: title, date, command, machine, load at the start."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    cmd = " ".join(shlex.quote(a) for a in ["python", str(script), *argv[1:]])
    return [f"# {title}", "",
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"Command: `{cmd}`",
            f"Machine: {machine()}",
            load_line("at the start"), ""]


def write_result(path: Path, text: str, append: bool = False) -> None:
    """Write (or append, separated by a rule) a result text and print it."""
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    if append and path.exists():
        text = path.read_text() + "\n---\n\n" + text
    path.write_text(text)
