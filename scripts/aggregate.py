"""Aggregate a sweep: ``python scripts/aggregate.py [SWEEP_DIR] [--eps 0.1] [--out DIR]``.

Reads every run record under SWEEP_DIR (default: the newest sweep under outputs/) into
results.csv, writes summary.txt and the plots (PNG, and as images in the TensorBoard run
SWEEP_DIR/aggregate), and prints the summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from randfeat_torch.analysis import aggregate, newest_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="default: the newest sweep")
    parser.add_argument("--eps", type=float, default=0.1, help="error for the width-needed plot")
    parser.add_argument("--out", type=Path, help="where to write (default: SWEEP_DIR)")
    args = parser.parse_args(argv)
    root = args.sweep_dir or newest_sweep()
    if root is None or not root.is_dir():
        print(f"aggregate: no sweep folder at {root or 'outputs/'}", file=sys.stderr)
        return 2
    if not 0 < args.eps < 10:
        print(f"aggregate: --eps={args.eps} (must be in (0, 10))", file=sys.stderr)
        return 2
    result = aggregate(root, args.eps, args.out)
    print(result.summary, end="")
    where = args.out or root
    print(f"wrote {where / 'results.csv'}, {where / 'summary.txt'} and {len(result.figures)} plots")
    return 0 if not result.table.empty else 1


if __name__ == "__main__":
    sys.exit(main())
