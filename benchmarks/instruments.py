"""What a benchmark measures inside one rank process (Linux): resident memory (/proc), timed
phases with their collectives, forward passes and memory (:class:`Phases`), the engine's own
state sizes and the model's shape."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any


def read_hwm_rss() -> tuple[int, int]:
    """(VmHWM, VmRSS) in bytes once freed heap is back to the OS (glibc's malloc_trim): the
    resident-set high-water mark since the process started or the last
    :meth:`Phases.memory_mark`, and the current resident set, what is live."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


#: collective -> (position and keyword of the tensor it sizes, the bytes each rank sends per
#: byte of that tensor at W ranks under the standard ring algorithms: all-gather and
#: reduce-scatter W−1 shards, all-reduce 2(W−1)/W of the tensor, broadcast and reduce it once)
_OPS: dict[str, tuple[int, str, Any]] = {
    "all_reduce": (0, "tensor", lambda w: 2 * (w - 1) / w),
    "all_gather": (1, "tensor", lambda w: w - 1),
    "all_gather_into_tensor": (1, "input_tensor", lambda w: w - 1),
    "_all_gather_base": (1, "input_tensor", lambda w: w - 1),
    "reduce_scatter": (0, "output", lambda w: w - 1),
    "reduce_scatter_tensor": (0, "output", lambda w: w - 1),
    "_reduce_scatter_base": (0, "output", lambda w: w - 1),
    "broadcast": (0, "tensor", lambda w: float(w > 1)),
    "reduce": (0, "tensor", lambda w: float(w > 1)),
    "all_to_all_single": (1, "input", lambda w: (w - 1) / w),
    "barrier": (0, "", lambda w: 0.0),
}


class Phases:
    """Times a rank's phases alike on every rank (a barrier first; CUDA synchronised), each with
    its collectives, forward passes and memory high-water mark. Made before DeepSpeed builds its
    communication backend (which keeps references to the torch.distributed functions), so that
    ZeRO's all-gathers and reduce-scatters are counted with u2a's own."""

    def __init__(self, gpu: bool) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.gpu, self.calls, self.wire = gpu, 0, 0.0  # collectives and the bytes they sent
        self.forwards = [0, 0, 0]  # calls, padded tokens, real tokens (the attention mask's)
        for name, sizing in _OPS.items():  # torch.distributed re-exports c10d's functions
            wrapped = self._wrap(getattr(c10d, name), *sizing)
            setattr(dist, name, wrapped)
            setattr(c10d, name, wrapped)

    def _wrap(self, original: Any, pos: int, key: str, per_byte: Any) -> Any:
        import torch.distributed as dist

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = args[pos] if len(args) > pos else kwargs.get(key)
            self.calls += 1
            if hasattr(t, "numel"):
                self.wire += per_byte(dist.get_world_size()) * t.numel() * t.element_size()
            return original(*args, **kwargs)

        return wrapper

    def watch(self, model: Any) -> None:
        """Count the forward passes of ``model`` from now on."""
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module: Any, args: tuple, kwargs: dict) -> None:
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        self.forwards[0] += 1
        self.forwards[1] += ids.numel()
        self.forwards[2] += int(mask.sum()) if mask is not None else ids.numel()

    def repeat(self, fn: Any, times: int = 1) -> tuple[Any, dict[str, Any]]:
        """fn() ``times`` times, each after a barrier: (the last result, {times_s, median_s, min_s,
        cpu_per_wall, comm, counted}). ``cpu_per_wall``: CPU seconds per wall second (about the
        threads when the process had its cores; far less when others starved it or it waited
        on its peers); ``comm``: the last repeat's collectives; ``counted``: forward passes."""
        import torch
        import torch.distributed as dist

        wall, cpu, forwards = [], [], list(self.forwards)
        for _ in range(times):
            if self.gpu:
                torch.cuda.synchronize()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()
            calls, wire = self.calls, self.wire
            c0, t0 = time.process_time(), time.perf_counter()
            result = fn()
            if self.gpu:
                torch.cuda.synchronize()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            comm = {"calls": self.calls - calls, "wire_bytes": int(self.wire - wire)}
        counted = {k: (now - before) / times for k, now, before in
                   zip(("forward_calls", "tokens", "real"), self.forwards, forwards)}
        return result, {"times_s": wall, "median_s": statistics.median(wall), "min_s": min(wall),
                        "cpu_per_wall": sum(cpu) / sum(wall), "comm": comm, "counted": counted}

    def memory_mark(self) -> dict[str, int]:
        """The memory high-water mark of the phase that just ended (on a GPU also the CUDA
        allocator's peak); then a fresh mark for the next phase."""
        out = {"hwm_bytes": read_hwm_rss()[0]}
        if self.gpu:
            import torch

            out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        # VmHWM back to the current RSS (Linux >= 4.0): the next mark is the next phase's peak
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return out


def model_shape(model: Any) -> dict[str, Any]:
    """Parameter count and the shape numbers the cost model needs. ``compute_params``: all but
    embedding tables used only as look-ups (2 x compute_params FLOPs per token forward);
    ``param_modules``: modules owning a parameter no earlier one owns (what ZeRO-3 gathers per
    pass; a tied lm_head gathers nothing)."""
    import torch

    cfg, params = model.config, list(model.parameters())
    out_w = getattr(model.get_output_embeddings(), "weight", None)
    lookup = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules()
                 if isinstance(m, torch.nn.Embedding) and m.weight is not out_w)
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    seen: set[int] = set()
    modules_with_params = 0
    for m in model.modules():
        own = [id(p) for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(own)
        modules_with_params += bool(own)
    return {"params": int(numel), "compute_params": int(numel - lookup),
            "param_tensors": len(params), "param_modules": modules_with_params,
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,  # GPT-2's too, aliased
            "heads": cfg.num_attention_heads, "vocab": cfg.vocab_size}


def engine_state(engine: Any) -> dict[str, Any]:
    """This rank's model-state bytes as the engine holds them (after a step): ``param_bytes``
    the partitions the forward reads; ``optimizer_state_bytes`` the base optimizer's state
    (Adam: exp_avg, exp_avg_sq); ``master_bytes`` separate copies the optimizer updates (ZeRO's
    fp32 partitions; at stage 3 ``fp32_partitioned_groups_flat``, which DeepSpeed 0.19.8 makes
    even for fp32 parameters, since its base optimizer's groups are empty outside step())."""
    import torch

    parts, base = engine.local_parts(), engine.optimizer
    while not isinstance(base, torch.optim.Optimizer):  # DeepSpeed's ZeRO wrappers
        base = base.optimizer
    states = [v for st in base.state.values() for v in st.values()
              if isinstance(v, torch.Tensor) and v.numel() > 1]
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    seen, master = {t.untyped_storage().data_ptr() for t in parts}, 0
    for t in [*(p for g in base.param_groups for p in g["params"]), *(flat or ())]:
        if t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            master += t.numel() * t.element_size()
    out = {"param_numel": sum(t.numel() for t in parts),
           "param_bytes": sum(t.numel() * t.element_size() for t in parts),
           "param_device": str(parts[0].device), "master_bytes": master,
           "optimizer_state_bytes": sum(v.numel() * v.element_size() for v in states),
           **({"zero3_master_counted": True} if flat is not None else {})}
    out["total_bytes"] = out["param_bytes"] + out["optimizer_state_bytes"] + out["master_bytes"]
    return out
