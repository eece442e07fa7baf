"""Entry point for the `deepspeed` launcher: one process per rank from a hostfile.

    deepspeed --hostfile H launcher/ds_launch.py --config FILE [section.key=value ...]

The launcher sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; rank 0 validates the config and data and
prepares the run directory, the others wait for it, then every rank runs the same job.
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
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from u2a_dist.config import load_config
    from u2a_dist.job import preflight, run_rank_from_dir
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
        preflight(cfg)
        run_dir.prepare(cfg)
        ready.write_text("ok\n")
    else:  # shared filesystem assumed, as for DeepSpeed checkpoints
        deadline = time.time() + 600
        while not ready.is_file():
            if time.time() > deadline:
                raise TimeoutError(f"rank 0 did not prepare {run_dir.path} within 600 s")
            time.sleep(0.5)
    return run_rank_from_dir(str(run_dir.path))


if __name__ == "__main__":
    sys.exit(main())
