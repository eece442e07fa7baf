"""Entry point for the `deepspeed` launcher: one process per rank from a hostfile.

    deepspeed --hostfile H launcher/ds_launch.py --config FILE [section.key=value ...]

The launcher sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; rank 0 validates the config and data and
prepares the run directory, the others wait for it, then every rank runs the same job. There is
no driver of ours under `deepspeed`: rank 0 draws the progress view itself (plain lines, as its
output reaches the console through the launcher's pipe; ``--progress`` or $U2A_PROGRESS).
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # older launchers pass this
    parser.add_argument("--progress", choices=["auto", "bar", "plain", "none"], default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # The ranks' malloc (runtime.allocator) must be there before the process starts; DeepSpeed's
    # launcher started this one, so it starts itself again, once, with it (same pid and args).
    from u2a_dist.allocator import reexec_with
    from u2a_dist.config import load_config

    reexec_with(load_config(args.config, args.overrides).runtime.allocator)

    if int(os.environ.get("RANK", "0")) != 0:
        return _run(args, None)
    from u2a_dist import progress
    from u2a_dist.runtime.display import ProgressView

    with ProgressView(args.progress) as view:
        progress.set_sink(view.event)
        return _run(args, view)


def _run(args: argparse.Namespace, view) -> int:
    from u2a_dist import progress
    from u2a_dist.config import load_config
    from u2a_dist.job import run_rank_from_dir
    from u2a_dist.preflight import preflight
    from u2a_dist.rundir import RunDir

    cfg = load_config(args.config, args.overrides + ["runtime.launcher=deepspeed"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.runtime.world_size:
        cfg = load_config(args.config, args.overrides + ["runtime.launcher=deepspeed",
                                                         f"runtime.world_size={world}"])
    run_dir = RunDir(cfg.out)
    ready = run_dir.path / ".prepared"
    if int(os.environ.get("RANK", "0")) == 0:
        ready.unlink(missing_ok=True)
        with progress.phase("preflight", what="config, model and data"):
            preflight(cfg)
        run_dir.prepare(cfg)
        ready.write_text("ok\n")
    else:  # shared filesystem assumed, as for DeepSpeed checkpoints
        deadline = time.time() + 600
        while not ready.is_file():
            if time.time() > deadline:
                raise TimeoutError(f"rank 0 did not prepare {run_dir.path} within 600 s")
            time.sleep(0.5)
    return run_rank_from_dir(str(run_dir.path), view.event if view is not None else None)


if __name__ == "__main__":
    # as u2a's own ranks end: a plain interpreter exit can abort in c10d/gloo's destructors
    # ("terminate called without an active exception", SIGABRT: CI saw rank 1 exit with -6 after
    # a finished run), which DeepSpeed's launcher reports as a failed run
    from u2a_dist.runtime.worker import exit_rank, main_exit_code

    exit_rank(main_exit_code(main))
