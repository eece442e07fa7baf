"""What a benchmark measures inside one rank process: resident memory (/proc), collectives
(:class:`CommCounter`), forward passes (:class:`ForwardCounter`), timed phases with per-phase
memory marks (:class:`Phases`), the engine's own state sizes (:func:`engine_state`) and the
model's shape (:func:`model_shape`)."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

# ---- per-process memory (Linux /proc) -------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's lifetime resident-set high-water mark (``ru_maxrss``), in bytes."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * (1 if sys.platform == "darwin" else 1024)  # macOS reports bytes


def read_hwm_rss() -> tuple[int, int]:
    """(VmHWM, VmRSS) in bytes: the high-water mark since the last :func:`reset_hwm` and the
    current resident set (``ru_maxrss`` for both off Linux)."""
    try:
        with open("/proc/self/status") as f:
            fields = {k: int(rest.split()[0]) * 1024 for k, _, rest in
                      (line.partition(":") for line in f) if k in ("VmHWM", "VmRSS")}
        return fields["VmHWM"], fields["VmRSS"]
    except (OSError, KeyError, ValueError):
        peak = peak_rss_bytes()
        return peak, peak


def reset_hwm() -> bool:
    """VmHWM back to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the
    next :func:`read_hwm_rss` reports the peak of what ran in between. False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS after a phase shows what is live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- collectives ------------------------------------------------------------------------------


def _nbytes(t: Any) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return int(t.numel() * t.element_size()) if hasattr(t, "numel") else 0


def _ring(pos: int, name: str, payload_times_w: bool, wire: Any) -> Any:
    """(payload, wire bytes this rank sends) of a collective whose tensor is argument ``pos``
    (or keyword ``name``): the payload is the whole logical tensor (W × it for gathers)."""
    def size(a: tuple, k: dict, w: int) -> tuple[float, float]:
        n = _nbytes(a[pos] if len(a) > pos else k.get(name))
        return (w * n if payload_times_w else n), wire(n, w)
    return size


def _gather_base(a: tuple, k: dict, w: int) -> tuple[float, float]:
    out = a[0] if a else k.get("output_tensor")
    inp = a[1] if len(a) > 1 else k.get("input_tensor")
    return _nbytes(out), (w - 1) * _nbytes(inp)


def _scatter_base(a: tuple, k: dict, w: int) -> tuple[float, float]:
    out = a[0] if a else k.get("output")
    inp = a[1] if len(a) > 1 else k.get("input")
    return _nbytes(inp), (w - 1) * _nbytes(out)


# Bytes each rank sends under the standard ring algorithms: all-gather and reduce-scatter
# (W−1)/W of the whole tensor, all-reduce twice that; broadcast and reduce the tensor once.
_OPS: dict[str, Any] = {
    "all_reduce": _ring(0, "tensor", False, lambda n, w: 2 * (w - 1) / w * n),
    "all_gather": _ring(1, "tensor", True, lambda n, w: (w - 1) * n),
    "all_gather_into_tensor": _gather_base, "_all_gather_base": _gather_base,
    "reduce_scatter": _ring(0, "output", True, lambda n, w: (w - 1) * n),
    "reduce_scatter_tensor": _scatter_base, "_reduce_scatter_base": _scatter_base,
    "broadcast": _ring(0, "tensor", False, lambda n, w: n if w > 1 else 0),
    "reduce": _ring(0, "tensor", False, lambda n, w: n if w > 1 else 0),
    "all_to_all_single": _ring(1, "input", False, lambda n, w: (w - 1) / w * n),
    "barrier": lambda a, k, w: (0, 0),
}


class CommCounter:
    """Counts every ``torch.distributed`` collective of this process with its bytes. Installed
    before DeepSpeed builds its communication backend (it keeps references to the torch
    functions), so ZeRO's all-gathers and reduce-scatters are counted as well as u2a's own
    all-reduces; one Python call per collective."""

    def __init__(self) -> None:
        self.counts: dict[str, list[float]] = {}  # op -> [calls, payload bytes, wire bytes]
        self._world = 1

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, size_fn in _OPS.items():
            original = getattr(dist, name, None) or getattr(c10d, name, None)
            if original is not None:
                wrapped = self._wrap(name, original, size_fn)
                for module in (dist, c10d):
                    if hasattr(module, name):
                        setattr(module, name, wrapped)

    def _wrap(self, name: str, original: Any, size_fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                payload, wire = size_fn(args, kwargs, self.world())
            except Exception:  # noqa: BLE001 - an odd call signature: count the call, not bytes
                payload = wire = 0
            row = self.counts.setdefault(name, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += payload
            row[2] += wire
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapper

    def world(self) -> int:
        if self._world == 1:
            import torch.distributed as dist

            if dist.is_initialized():
                self._world = dist.get_world_size()
        return self._world

    def snapshot(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.counts.items()}

    def since(self, snap: dict[str, list[float]]) -> dict[str, Any]:
        """Collectives since ``snap``: per op and in total (calls, payload and wire bytes)."""
        ops = {}
        for name, (calls, payload, wire) in self.counts.items():
            c0, p0, w0 = snap.get(name, [0, 0.0, 0.0])
            if calls - c0:
                ops[name] = {"calls": int(calls - c0), "payload_bytes": int(payload - p0),
                             "wire_bytes": int(wire - w0)}
        return {**{k: sum(o[k] for o in ops.values())
                   for k in ("calls", "wire_bytes", "payload_bytes")}, "ops": ops}


# ---- forward passes and timed phases ----------------------------------------------------------


class ForwardCounter:
    """This rank's model forward calls and the tokens they ran on (padded, and ``real``: the
    attention mask's ones) from its creation to :meth:`close`: what a phase really computed."""

    def __init__(self, model: Any) -> None:
        self.calls = self.tokens = self.real = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.calls += 1
        self.tokens += int(ids.numel()) if ids is not None else 0
        self.real += int(mask.sum()) if mask is not None else int(ids.numel())

    def close(self, times: int = 1) -> dict[str, float]:
        """Removes the hook; the counts per repeat (``times`` repeats of the phase)."""
        self._handle.remove()
        return {"forward_calls": self.calls / times, "tokens": self.tokens / times,
                "real": self.real / times}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class Phases:
    """Times a phase the same way on every rank (a barrier first; CUDA synchronised) with its
    collectives, and marks each phase's memory high-water mark."""

    def __init__(self, counter: CommCounter, gpu: bool) -> None:
        self.counter, self.gpu = counter, gpu

    def sync(self) -> None:
        import torch
        import torch.distributed as dist

        if self.gpu:
            torch.cuda.synchronize()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def repeat(self, fn: Any, times: int = 1) -> tuple[Any, dict[str, Any]]:
        """fn() ``times`` times: (last result, {times_s, median_s, min_s, cpu_per_wall, comm}).
        ``cpu_per_wall``: the process's CPU seconds per wall second (about its threads when it
        had its cores; far less when other processes starved it or it waited on its peers);
        ``comm``: the last repeat's collectives."""
        result, wall, cpu, comm = None, [], [], {}
        for _ in range(max(1, times)):
            self.sync()
            snap = self.counter.snapshot()
            c0, t0 = time.process_time(), time.perf_counter()
            result = fn()
            if self.gpu:
                import torch

                torch.cuda.synchronize()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            comm = self.counter.since(snap)
        return result, {"times_s": wall, "median_s": median(wall), "min_s": min(wall),
                        "cpu_per_wall": sum(cpu) / sum(wall) if sum(wall) > 0 else None,
                        "comm": comm}

    def memory_mark(self) -> dict[str, int]:
        """High-water mark of the phase that just ended (and on a GPU the CUDA allocator's peak
        of allocated and reserved bytes); then a fresh mark for the next phase."""
        hwm, rss = read_hwm_rss()
        out = {"hwm_bytes": hwm, "rss_bytes": rss, "ru_maxrss_bytes": peak_rss_bytes()}
        if self.gpu:
            import torch

            out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
            out["cuda_reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        malloc_trim()
        reset_hwm()
        return out


# ---- the model and the engine -----------------------------------------------------------------


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
            "layers": int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0))),
            "hidden": int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))),
            "heads": int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 0))),
            "vocab": int(cfg.vocab_size)}


def engine_state(engine: Any) -> dict[str, Any]:
    """This rank's model-state bytes as the engine holds them (after the first step):
    ``param_bytes`` the storage the forward reads (ZeRO-3: the partitions); ``optimizer_state_
    bytes`` the base optimizer's state (Adam: exp_avg, exp_avg_sq); ``master_bytes`` separate
    copies the optimizer updates (ZeRO's fp32 partitions: at stage 3 in
    ``fp32_partitioned_groups_flat``, which DeepSpeed 0.19.8 copies even for fp32 parameters);
    ``grad_bytes_after_step`` gradients attached to those."""
    import torch

    parts = engine.local_parts()
    model_ptrs = {t.untyped_storage().data_ptr() for t in parts}
    base, seen = engine.optimizer, 0
    while base is not None and not isinstance(base, torch.optim.Optimizer) and seen < 5:
        base, seen = getattr(base, "optimizer", None), seen + 1
    base = base if isinstance(base, torch.optim.Optimizer) else None
    states = [v for st in (base.state.values() if base else ()) for v in st.values()
              if isinstance(v, torch.Tensor) and v.numel() > 1]
    master = grads = 0
    ptrs: set[int] = set()
    for p in (p for g in (base.param_groups if base else ()) for p in g["params"]):
        ptr = p.untyped_storage().data_ptr()
        if ptr not in ptrs:
            ptrs.add(ptr)
            master += p.numel() * p.element_size() if ptr not in model_ptrs else 0
            grads += p.grad.numel() * p.grad.element_size() if p.grad is not None else 0
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    out: dict[str, Any] = {} if flat is None else {"zero3_master_counted": True}
    for t in flat or ():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr not in model_ptrs and ptr not in ptrs:
            ptrs.add(ptr)
            master += t.numel() * t.element_size()
    out.update({
        "param_numel": int(sum(t.numel() for t in parts)),
        "param_bytes": int(sum(t.numel() * t.element_size() for t in parts)),
        "param_device": str(parts[0].device) if parts else "cpu",
        "optimizer_device": str(states[0].device) if states else None,
        "optimizer_state_bytes": int(sum(v.numel() * v.element_size() for v in states)),
        "master_bytes": int(master), "grad_bytes_after_step": int(grads),
        "optimizer": type(engine.optimizer).__name__,
        "base_optimizer": type(base).__name__ if base is not None else None})
    out["total_bytes"] = out["param_bytes"] + out["optimizer_state_bytes"] + out["master_bytes"]
    return out
