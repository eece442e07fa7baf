"""One rank process: ``python -m u2a_dist.runtime.worker --run-dir DIR`` (env gives the rank)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    from u2a_dist.job import rank_main

    return rank_main(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
