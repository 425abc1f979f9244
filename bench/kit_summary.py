"""summary.json of the GPU kit from its steps.jsonl, with the standard library alone.

Its own module so that it starts in well under a second: as a step of bench/gpu_check.py it paid
torch's import (over 5 s on a CUDA machine) and its cap killed it on the H200 (2026-12-04).

    python -m bench.kit_summary STEPS_JSONL SUMMARY_JSON [--dry-run]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarize(steps: Path | None, dry_run: bool) -> dict:
    """Every step's result, exit code, seconds and whether its cap killed it."""
    summary: dict = {"dry_run": dry_run, "steps": {}, "exit_codes": {}, "timed_out": [], "seconds": {}}
    for line in steps.read_text().splitlines() if steps and steps.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            summary.setdefault("unreadable_lines", []).append(f"{err}: {line[:200]}")
            continue
        name = entry["step"]
        summary["steps"][name] = entry.get("result")
        summary["exit_codes"][name] = entry["exit"]
        summary["seconds"][name] = entry.get("seconds")
        if entry.get("timed_out"):
            summary["timed_out"].append(name)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("steps", type=Path)
    p.add_argument("result", type=Path)
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    a.result.write_text(json.dumps(summarize(a.steps, a.dry_run), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
