"""Rewrite the settings table of README.md from ``Settings.describe()`` (run after adding or changing a setting)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml_backend.settings import Settings  # noqa: E402


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    rows = "\n".join(f"| `{env}` | `{default}` | {help_} |" for env, default, help_ in Settings.describe())
    table = "| variable | default | meaning |\n|---|---|---|\n" + rows + "\n"
    new, n = re.subn(r"\| variable \| default \| meaning \|\n\|---\|---\|---\|\n(?:\|[^\n]*\|\n)+", table, text)
    if n != 1:
        raise SystemExit("README.md has no settings table (| variable | default | meaning |) to replace")
    readme.write_text(new)


if __name__ == "__main__":
    main()
