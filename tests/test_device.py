"""runtime.device: which device each rank resolves to (the decision alone: CUDA counts are
simulated here; tests/test_gpu.py trains on a real GPU against the CPU)."""

from __future__ import annotations

import pytest
import torch

from u2a_dist.config import ConfigError
from u2a_dist.device import check_local_launch, comm_device, resolve_device, to_device


def _gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_without_gpus_auto_and_cpu_give_the_cpu_and_cuda_is_refused(monkeypatch):
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="runtime.device: 'cuda', but this rank sees no CUDA"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="runtime.device must be one of"):
        resolve_device("gpu")


def test_auto_takes_gpus_only_when_every_rank_of_the_node_gets_one(monkeypatch):
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    # 4 ranks on 2 GPUs: NCCL cannot put two ranks on one GPU, so auto keeps all on the CPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ConfigError, match="local rank 3, but this node has 2 CUDA device"):
        resolve_device("cuda")


def test_the_local_launch_check_counts_gpus_against_the_world_size(monkeypatch):
    _gpus(monkeypatch, 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert check_local_launch("auto", 1) == torch.device("cuda", 0)
    assert check_local_launch("auto", 2) == torch.device("cpu")
    with pytest.raises(ConfigError, match="world_size=2 needs 2 CUDA device"):
        check_local_launch("cuda", 2)
    assert "LOCAL_WORLD_SIZE" not in __import__("os").environ


def test_cpu_batches_and_collectives_stay_on_the_cpu():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "n": 2}
    assert to_device(batch, torch.device("cpu")) is batch
    assert comm_device() == torch.device("cpu")  # no process group: gloo's side
