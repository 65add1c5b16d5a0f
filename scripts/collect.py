#!/usr/bin/env python3
"""Gather every run of a sweep (or any folder of runs) into one table and one plot.

  python scripts/collect.py SWEEP_DIR [--metric=loss]

Writes SWEEP_DIR/results.md, results.csv and curves.png and prints the table. Failed, stopped and
unfinished runs stay in the table with their status (and dashed in the plot); exit code 0 either way.
"""

import argparse
import os
import sys

from jaxpar.launch.collect import collect


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir")
    parser.add_argument(
        "--metric", default=None, help="curve key in metrics.jsonl (default: loss, else return)"
    )
    args = parser.parse_args()
    if not os.path.isdir(args.sweep_dir):
        sys.exit(f"error: {args.sweep_dir} is not a directory.")
    runs, outputs = collect(args.sweep_dir, args.metric)
    if not runs:
        sys.exit(
            f"error: no runs in {args.sweep_dir} (no manifest.json, and no subdirectory with "
            "metrics.jsonl, launch.json, status.json or config.json)."
        )
    with open(outputs["markdown"]) as f:
        print(f.read())
    print("wrote " + ", ".join(outputs.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
