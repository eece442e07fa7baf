"""LoRA (``model.lora``, issue 25) through the two launchers that are not the local one:
``u2a run --launcher ray`` (an embedded Ray, one actor per ZeRO-3 rank) and DeepSpeed's own
``deepspeed`` launcher (whose rank 0 draws the live view) give the same losses on the same config
(tolerance TOL; in practice bit-identical: the same ``run_rank`` on the same ranks) and write the
same adapters and the same merged model. The local launcher's LoRA runs are test_lora.py's, and
tests/test_ray.py ties Ray's runs to the local launcher's; a local run here as a third reference
cost ~50 s of the CI's 25 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PROGRESS_LINE, REPO, tiny_config
from tests.ray_helpers import base_env, losses, run_u2a, write_config
from u2a_dist.allocator import find_jemalloc

TOL = 1e-6
STEPS = 4
LORA = {"name_or_path": "tiny-gpt2", "lora": {"r": 4, "alpha": 8}}

pytestmark = pytest.mark.slow


def _config(path: Path, run: Path) -> Path:
    return write_config(path, tiny_config(run, model=LORA,
                                          unlearn={"optimizer": "sgd", "lr": 0.5,
                                                   "steps": STEPS},
                                          runtime={"world_size": 2, "checkpoint_every": 2}))


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("lora_ray")
    res = run_u2a(["run", "--config", str(_config(root / "cfg.yaml", root / "run")),
                   "--launcher", "ray"], base_env(), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    return root / "run", out


def _assert_same_run(run: Path, ref: Path) -> None:
    got, want = losses(run), losses(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    assert want[-1][1] != want[0][1]  # it trained
    torch.testing.assert_close(torch.tensor([v for _, v in got], dtype=torch.float64),
                               torch.tensor([v for _, v in want], dtype=torch.float64),
                               rtol=TOL, atol=TOL)
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(run / "model" / name), load_file(ref / "model" / name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=TOL, atol=TOL, msg=key)
    adapters = load_file(ref / "model" / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k for k in adapters) and len(adapters) == 2 * 8  # A, B × 8 layers
    # the checkpoint holds the adapters (and their optimizer state) only, under every launcher
    ckpt = run / "checkpoints" / f"step{STEPS}"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    base = 4 * sum(t.numel() for k, t in load_file(ref / "model" / "model.safetensors").items())
    assert 0 < size < base / 2, (size, base)


def test_lora_under_ray_trains_the_adapters_only(ray_run) -> None:
    run, out = ray_run
    assert "[u2a] ray: 2 ranks on 1 node(s)" in out, out[-3000:]
    _assert_same_run(run, run)  # its own losses, adapters and checkpoint size


def test_deepspeed_launcher_rank0_draws_the_view_and_lora_gives_the_ray_run(tmp_path, netns,
                                                                             ray_run) -> None:
    """`deepspeed launcher/ds_launch.py`: two rank processes from DeepSpeed's own launcher (in a
    network namespace: its rendezvous store listens on every interface); rank 0 prints the
    progress lines (there is no other driver), and the LoRA run is Ray's."""
    cfg = _config(tmp_path / "cfg.yaml", tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "U2A_PROGRESS": "plain"}
    res = subprocess.run(
        ["ip", "netns", "exec", netns, str(Path(sys.executable).parent / "deepspeed"),
         "--num_nodes", "1", "--num_gpus", "2", "--master_addr", "127.0.0.1",
         "--master_port", "29511", str(REPO / "launcher" / "ds_launch.py"), "--config", str(cfg)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert PROGRESS_LINE.search(res.stdout), out[-5000:]
    assert "| preflight: config, model and data" in res.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == STEPS
    # each rank ran on the malloc runtime.allocator=auto picks (jemalloc where installed):
    # ds_launch.py re-executed itself with it
    assert summary["memory"]["allocator"] == [
        "jemalloc" if find_jemalloc() else "system"] * 2, summary["memory"]
    _assert_same_run(tmp_path / "run", ray_run[0])
