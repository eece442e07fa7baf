"""Forward passes over whole data sets, sharded across ranks.

Under ZeRO-3 a forward pass is a collective (every layer all-gathers its weights), so every rank
must make the same number of forward calls with the same batch size even when the data set does
not divide evenly: each rank's share is padded by repeating its first item, and the padded
results are dropped after the all-gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from u2a_dist import allocator, progress
from u2a_dist.data.tokenize import collate
from u2a_dist.device import comm_device, model_device, to_device
from u2a_dist.losses import sequence_logps


def world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(value: float | torch.Tensor) -> float:
    """Σ over ranks of a scalar (on the backend's device: NCCL reduces CUDA tensors only)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return float(t)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor of the same shape on every rank (a new tensor)."""
    rank_size = world()[1]
    if rank_size == 1:
        return t.clone()
    out = t.detach().to(comm_device(), copy=True)
    dist.all_reduce(out)
    return out.div_(rank_size).to(t.device)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's object on every rank (identity on one process)."""
    rank, size = world()
    if size == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def padded_shares(n: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Strided shares of range(n), each padded to the same multiple of batch_size.

    A padding slot holds -1 and is replaced by a real item before the forward pass.
    """
    per = -(-n // world_size)
    per = -(-per // batch_size) * batch_size
    shares = []
    for r in range(world_size):
        share = list(range(r, n, world_size))
        shares.append(share + [-1] * (per - len(share)))
    return shares


def all_gather_rows(local: torch.Tensor) -> list[torch.Tensor]:
    """All-gather equal-shaped tensors from every rank (identity on one process)."""
    rank, size = world()
    if size == 1:
        return [local]
    home = local.device
    local = local.to(comm_device()).contiguous()  # NCCL gathers CUDA tensors, gloo CPU ones
    out = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(out, local)
    return [t.to(home) for t in out]


def peak_memory_gb() -> dict[str, list]:
    """Every rank's peak resident memory so far (``ru_maxrss``) and, on a GPU, its peak CUDA
    allocation, in GB (10⁹ bytes), and the malloc it runs on, in rank order. A collective."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
    cuda = float(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0
    jemalloc = float(allocator.in_use() == "jemalloc")
    rows = all_gather_rows(torch.tensor([rss, cuda, jemalloc], dtype=torch.float64))
    out: dict[str, list] = {"peak_rss_gb": [round(float(r[0]) / 1e9, 3) for r in rows],
                            "allocator": ["jemalloc" if r[2] else "system" for r in rows]}
    if any(float(r[1]) > 0 for r in rows):
        out["peak_cuda_gb"] = [round(float(r[1]) / 1e9, 3) for r in rows]
    return out


@torch.no_grad()
def dataset_logps(model, items: Sequence[dict[str, list[int]]], pad_id: int,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ response log-prob, response length) for every item, on every rank, in item order.

    Values only, without autograd: with grad enabled, copying each batch's log-probs into
    ``values`` kept every batch's graph alive until the end (on SmolLM2 the selector's scoring
    passes over 263 negatives grew a rank to 11.7 GB and the OOM killer stopped it).
    """
    rank, size = world()
    device = model_device(model)
    n = len(items)
    shares = padded_shares(n, size, batch_size)
    mine = shares[rank]
    filler = next((i for i in mine if i >= 0), 0)
    values = torch.zeros(len(mine), 2, dtype=torch.float64)
    for start in progress.each("log-probs", range(0, len(mine), batch_size)):
        idx = [i if i >= 0 else filler for i in mine[start:start + batch_size]]
        batch = to_device(collate([items[i] for i in idx], pad_id), device)
        logp, ntok = sequence_logps(model, batch)
        values[start:start + len(idx), 0] = logp.double().cpu()
        values[start:start + len(idx), 1] = ntok.double().cpu()
    gathered = all_gather_rows(values)
    out = torch.zeros(n, 2, dtype=torch.float64)
    for r, share in enumerate(shares):
        for j, i in enumerate(share):
            if i >= 0:
                out[i] = gathered[r][j]
    return out[:, 0], out[:, 1]


def response_nll(model, items: Sequence[dict[str, list[int]]], pad_id: int,
                 batch_size: int = 8) -> torch.Tensor:
    """Mean-token NLL of each item (used by scripts and tests to check forgetting)."""
    logp, ntok = dataset_logps(model, items, pad_id, batch_size)
    return -logp / ntok.clamp(min=1)
