"""Where a rank computes, and where the tensors of its collectives must live.

``runtime.device``: ``auto`` takes the rank's CUDA device (``LOCAL_RANK``) when the node has a
GPU for each of its ranks (``LOCAL_WORLD_SIZE``), else the CPU; ``cuda`` insists on one; ``cpu``
stays on the CPU even where a GPU is visible. The model's device decides where batches go
(:func:`to_device`); the process group's backend decides where a collective's tensor must be
(NCCL reduces CUDA tensors only, gloo CPU ones: :func:`comm_device`). Data, caches and weights
are built on the CPU and moved once at the point of use, so the CPU path is unchanged and every
value is the same on either device.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from u2a_dist.config import DEVICES, ConfigError


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(kind: str = "auto", local_rank: int | None = None,
                   ranks_here: int | None = None) -> torch.device:
    """The device a rank computes on for ``runtime.device`` = ``kind``; ``local_rank`` and
    ``ranks_here`` (the node's rank count) default to LOCAL_RANK and LOCAL_WORLD_SIZE."""
    if kind not in DEVICES:
        raise ConfigError(f"runtime.device must be one of {list(DEVICES)}, got {kind!r}")
    count = _gpu_count()
    # Every rank of a node decides alike: GPUs for all of them (NCCL wants one GPU per rank)
    # or the CPU for all of them (gloo), never a mix.
    if ranks_here is None:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if kind == "cpu" or (kind == "auto" and count < max(1, ranks_here)):
        return torch.device("cpu")
    if count == 0:
        raise ConfigError("runtime.device: 'cuda', but this rank sees no CUDA device "
                          f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use 'auto' or 'cpu'")
    local = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if local >= count:
        raise ConfigError(f"runtime.device: 'cuda' for local rank {local}, but this node has "
                          f"{count} CUDA device(s): one rank per GPU")
    return torch.device("cuda", local)


def check_local_launch(kind: str, world_size: int) -> torch.device:
    """What every rank of a local launch of ``world_size`` ranks on this machine will resolve
    ``runtime.device`` to; a ConfigError naming the key, before any rank or run directory
    exists, when ``cuda`` asks for more GPUs than the machine has."""
    count = _gpu_count()
    if kind == "cuda" and count < world_size:
        raise ConfigError(f"runtime.device: 'cuda' with runtime.world_size={world_size} needs "
                          f"{world_size} CUDA device(s), one per rank; this machine has {count}"
                          " (use 'auto' to fall back to the CPU)")
    return resolve_device(kind, local_rank=0, ranks_here=world_size)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a module's forward pass takes its inputs on (DeepSpeed's engine knows its
    own; under ZeRO-3 offload the parameters' partitions sit on the CPU, the forward does not)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (a no-op on the CPU)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def comm_device() -> torch.device:
    """Where a tensor handed to a collective must be: the current CUDA device under NCCL,
    else the CPU (gloo; also when no process group exists)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
