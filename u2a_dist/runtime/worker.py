"""One rank process: ``python -m u2a_dist.runtime.worker --run-dir DIR`` (env gives the rank)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    from u2a_dist.job import run_rank_from_dir

    return run_rank_from_dir(args.run_dir)


def exit_rank(code: int) -> None:
    """Leave the process group and exit without running C++ static destructors.

    A rank that simply returns can abort at interpreter shutdown ("terminate called without an
    active exception", SIGABRT) when c10d/gloo threads are destroyed while still joinable, which
    turns a finished rank into a failed one. Everything the rank writes is already on disk.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main_exit_code(entry=None) -> int:
    """``entry()``'s status (this module's main by default); a failure's traceback printed as
    Python would, status 1. A rank that let the exception end the interpreter would abort in
    those destructors (SIGABRT), and the launcher would then take the abort, not the error, for
    the cause. Every rank entry point ends with ``exit_rank(main_exit_code(its_main))``."""
    try:
        return (entry or main)()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    exit_rank(main_exit_code())
