"""The local launcher listens on loopback only: rendezvous store, gloo pairs, everything."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tests.conftest import REPO, tiny_config
from tests.ray_helpers import ListenerWatch

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_local_launcher_binds_only_loopback(tmp_path):
    cfg = tiny_config(tmp_path / "run", unlearn={"steps": 4})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "u2a_dist.cli", "run", "--config", str(path),
                             "--launcher", "local"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watch = ListenerWatch(roots=[proc.pid], period_s=0.3)
    watch.start()
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        watch.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    # the launcher's store and both ranks' gloo listeners were seen, all on loopback
    assert len({pid for pid, *_ in watch.seen}) >= 2 and watch.samples > 3, watch.seen
    assert watch.bad(LOOPBACK) == [], watch.bad(LOOPBACK)
