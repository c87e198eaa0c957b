"""The README's benchmark table stays reproducible: each row's command (and the flags its text quotes) is accepted by
that script's own argument parser today, and every result file a row cites is committed under ``bench/results/``.

The commands are parsed, not run (the benchmarks take minutes to hours): each script runs as ``__main__`` in one
child process with ``argparse`` stopped right after a successful parse.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARSE_ONLY = r"""
import argparse, json, runpy, sys

class Parsed(Exception):
    pass

_parse = argparse.ArgumentParser.parse_args

def parse_then_stop(self, args=None, namespace=None):
    _parse(self, args, namespace)
    raise Parsed()

argparse.ArgumentParser.parse_args = parse_then_stop
out = {}
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        out[" ".join(sys.argv)] = "ran without parsing its arguments"
    except Parsed:
        out[" ".join(sys.argv)] = "ok"
    except SystemExit as exc:
        out[" ".join(sys.argv)] = f"rejected (exit {exc.code})"
    except Exception as exc:
        out[" ".join(sys.argv)] = f"failed before its arguments were parsed: {type(exc).__name__}: {exc}"
print("PARSED " + json.dumps(out))
"""


def benchmark_rows() -> list[tuple[str, str]]:
    """(command cell, result cell) of each row of the README's benchmark table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Benchmarks"):text.index("## Tests")]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `bench/")]
    assert len(rows) >= 15, "the benchmark table was not found in the README"
    return [(cells[0], cells[-1]) for cells in rows]


def commands() -> list[tuple[str, list[str]]]:
    """Each row's script with its arguments, and again with each flag set its text quotes added (the text says "the
    same, with ``--first-seed 100``": a flag given twice takes its last value)."""
    out = []
    for command_cell, result_cell in benchmark_rows():
        spans = re.findall(r"`([^`]+)`", command_cell)
        script, *args = next(s for s in spans if s.startswith("bench/")).split()
        if not script.endswith(".py"):
            continue  # bench/gpu.sh: tests/test_gpu_bench.py runs it
        out.append((script, args))
        for quoted in re.findall(r"`([^`]+)`", command_cell + " " + result_cell):
            if quoted.startswith("--") and quoted != "--dry-run":
                out.append((script, [*args, *quoted.split()]))
    return out


def test_every_benchmark_command_in_the_readme_is_accepted_by_its_script() -> None:
    todo = commands()
    child = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(todo)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    line = next((x for x in child.stdout.splitlines() if x.startswith("PARSED ")), None)
    assert line is not None, child.stderr[-3000:]
    verdicts = json.loads(line[len("PARSED "):])
    assert len(verdicts) == len({" ".join([s, *a]) for s, a in todo})
    bad = {cmd: v for cmd, v in verdicts.items() if v != "ok"}
    assert not bad, f"{bad}\n{child.stderr[-3000:]}"


def test_every_result_file_a_row_cites_is_committed() -> None:
    results = ROOT / "bench" / "results"
    cited = set()
    for command_cell, result_cell in benchmark_rows():
        for name in re.findall(r"`([^`\s]+\.txt)`", command_cell + " " + result_cell):
            cited.add(Path(name).name)
    assert len(cited) >= 10
    missing = sorted(n for n in cited if not (results / n).is_file())
    assert not missing, f"cited in the README's benchmark table but not in bench/results/: {missing}"
