"""Entry point for `ray job submit`: the job's driver, which starts one Ray actor per rank.

    ray job submit --address http://HOST:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", "runs", ".git"]}' \\
        -- python launcher/ray_submit.py --config FILE [section.key=value ...]

Runs on the cluster the job was submitted to (Ray sets RAY_ADDRESS for the driver); the run
directory (`out`) must be on a filesystem every node sees, as for DeepSpeed checkpoints.
Exit status: 0 done, 1 the job failed (one line on stderr; details in <out>/logs), 2 bad config.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="u2a job driver for `ray job submit`")
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run directory instead of resuming it")
    parser.add_argument("--progress", choices=["auto", "bar", "plain", "none"], default=None,
                        help="the live view (default: plain lines in `ray job logs`)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    from u2a_dist.cli import main as cli_main

    cli_args = ["run", "--config", args.config, "--launcher", "ray"]
    if args.overwrite:
        cli_args.append("--overwrite")
    if args.progress:
        cli_args += ["--progress", args.progress]
    return cli_main(cli_args + ["runtime.launcher=ray", *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
