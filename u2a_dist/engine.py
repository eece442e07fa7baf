"""The DeepSpeed engine and everything that touches its ZeRO partitions.

Only this module (and linalg.py) knows that ZeRO-3 holds a 1/W partition of every parameter in
``p.ds_tensor``; the trainer and the selector see ``local_parts()`` and ``local_grads()``: lists
of fp32 tensors with the partition layout (zero padding included), on every stage. For stages
0–2 every rank holds whole parameters, so ``partitioned`` is False and sharded reductions must not
all-reduce (the selector passes ``group=None`` then).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from u2a_dist.config import ConfigError, RunConfig
from u2a_dist.device import comm_device, resolve_device

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def init_distributed(timeout_s: int = 600, device: str = "auto") -> tuple[int, int]:
    """Join the process group from RANK/WORLD_SIZE/MASTER_ADDR/PORT: NCCL on the rank's GPU
    (``runtime.device`` resolving to CUDA, :func:`u2a_dist.device.resolve_device`), else gloo on
    the CPU."""
    import torch.distributed as dist

    target = resolve_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)  # before NCCL: one GPU per rank, not all on GPU 0
    elif torch.cuda.is_available():
        # runtime.device=cpu where a GPU is visible: DeepSpeed would place the engine on it
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        if backend == "gloo":
            # DeepSpeed JIT-compiles a shared-memory all-reduce at init on CPU hosts (a minute of
            # C++ on a fresh machine, needing a compiler) that only tensor-parallel inference
            # calls; ZeRO-3 on gloo never does. Its op table is meant to be edited this way.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def is_partitioned(model: torch.nn.Module) -> bool:
    """True for a model whose parameters ZeRO-3 partitions (its forward is a collective)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def resolve_ds_config_path(path: str) -> Path:
    """A DeepSpeed JSON path as given, or relative to the repository/package root."""
    for candidate in (Path(path), REPO_ROOT / path, Path(__file__).parent / "ds_configs"
                      / Path(path).name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"runtime.ds_config: {path!r} not found")


def build_ds_config(cfg: RunConfig, world_size: int, train: bool = True,
                    frozen: bool = False) -> dict[str, Any]:
    """The JSON file of runtime.ds_config with the run's batch, stage and precision applied
    (``frozen``: an engine that computes gradients and never steps, :meth:`Engine.fp32_twin`)."""
    path = resolve_ds_config_path(cfg.runtime.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    ds["train_micro_batch_size_per_gpu"] = max(1, cfg.unlearn.batch_size // world_size)
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.runtime.zero_stage
    if cfg.runtime.zero_stage == 3:
        # Parameters under the threshold would stay unpartitioned; the selector's sharded
        # vectors assume every parameter is partitioned (docs/design.md §6).
        zero["stage3_param_persistence_threshold"] = 0
    if frozen:
        # no optimizer state to move: the frozen engine's SGD at lr 0 keeps none
        zero.pop("offload_optimizer", None)
    ds["gradient_clipping"] = cfg.unlearn.grad_clip if train and not frozen else 0.0
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}
    ds["fp16"] = {"enabled": cfg.model.dtype == "float16"}
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def lr_scheduler(optimizer: torch.optim.Optimizer,
                 unlearn: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """``unlearn.lr_scheduler_type`` after ``unlearn.warmup_steps`` over ``unlearn.steps``, by
    transformers' own schedules (a LambdaLR whose state DeepSpeed checkpoints and restores)."""
    from transformers import get_scheduler

    name = unlearn.lr_scheduler_type
    if name == "constant" and unlearn.warmup_steps:
        name = "constant_with_warmup"  # transformers' "constant" ignores the warm-up
    return get_scheduler(name, optimizer, num_warmup_steps=unlearn.warmup_steps,
                         num_training_steps=unlearn.steps)


class Engine:
    """A DeepSpeed engine around one causal LM, with partition-level access for the selector."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, world_size: int,
                 train: bool = True, frozen: bool = False) -> None:
        """``train``: gradients and the run's optimizer. ``frozen``: gradients (ZeRO's
        partitioned ones at stage 3, which DeepSpeed only sets up with an optimizer) from an
        SGD at lr 0 that is never stepped."""
        import deepspeed

        self.cfg = cfg
        self.world_size = world_size
        self.stage = cfg.runtime.zero_stage
        self.ds_config = build_ds_config(cfg, world_size, train=train, frozen=frozen)
        optimizer = scheduler = None
        if train and cfg.runtime.gradient_checkpointing:
            # Non-reentrant: the selector's exact HVPs differentiate through it twice, and ZeRO-3
            # gathers a layer's partitions again for its recomputation. transformers checkpoints
            # in training mode only (dropout as the model's config has it; SmolLM2: none).
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5.x
            (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
            model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if frozen:
            optimizer = torch.optim.SGD(params, lr=0.0)
        elif train:
            if cfg.unlearn.optimizer == "adamw":
                optimizer = torch.optim.AdamW(params, lr=cfg.unlearn.lr,
                                              weight_decay=cfg.unlearn.weight_decay)
            else:
                optimizer = torch.optim.SGD(params, lr=cfg.unlearn.lr,
                                            weight_decay=cfg.unlearn.weight_decay)
            scheduler = lr_scheduler(optimizer, cfg.unlearn)
        else:
            model.requires_grad_(False)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.params = [p for p in self.ds.module.parameters() if p.requires_grad or not train]
        self.partitioned = self.stage == 3
        self._stage0_grad_norm: float | None = None  # see step()

    @classmethod
    def fp32_twin(cls, cfg: RunConfig, model: torch.nn.Module, world_size: int) -> Engine:
        """An fp32, frozen engine with the same ZeRO stage and partition layout as the run's,
        for the selector of a bf16/fp16 run (docs/design.md §3: its finite differences perturb the
        weights by about 1%, which 16-bit weights round away). :meth:`load_parts` fills it
        with the run engine's :meth:`fp32_master_parts`."""
        model = model.float()
        cfg32 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
        twin = cls(cfg32, model, world_size, train=True, frozen=True)
        twin._drop_stage3_master()
        return twin

    def _drop_stage3_master(self) -> None:
        """Free ZeRO-3's fp32 master copy of a frozen engine's partitions (it never steps).

        DeepSpeed 0.19.8 keeps one even for fp32 parameters on the CPU (separate storage from
        ``p.ds_tensor``, 4 bytes per local parameter: a third of the twin). Stages 0-2 are left
        alone: there the gradients are read through the master copy's partition.
        """
        if self.stage != 3:
            return
        mine = {t.untyped_storage().data_ptr() for t in self.local_parts()}
        for t in getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", []):
            if t.numel() and t.untyped_storage().data_ptr() not in mine:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    # ------------------------------------------------------------------ forward / step

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        """Where the forward pass takes its inputs (the rank's GPU, or the CPU)."""
        return torch.device(self.ds.device)

    def forward(self, **batch: torch.Tensor):
        return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def accumulate(self, last: bool) -> None:
        """Mark the next backward as one micro-batch of a step (gradient accumulation): its
        gradient is added to the earlier ones', and only after the ``last`` does DeepSpeed
        all-reduce (stage 0) and :meth:`step` update (ZeRO-3 reduce-scatters every pass)."""
        self.ds.set_gradient_accumulation_boundary(last)

    def step(self) -> None:
        if self.stage == 0:
            # DeepSpeed keeps no global gradient norm at stage 0 (its fp32 clipping computes one
            # and drops it); every rank holds the whole all-reduced gradient here, so its local
            # norm is the global one: before clipping, as DeepSpeed reports it at stages 1-3.
            grads = [p.grad.detach().float() for p in self.params if p.grad is not None]
            self._stage0_grad_norm = float(torch.nn.utils.get_total_norm(grads))
        self.ds.step()

    def zero_grad(self) -> None:
        # engine.zero_grad() alone leaves micro_step_id set and gradients accumulate (§6).
        self.ds.zero_grad()
        if self.optimizer is not None:
            self.optimizer.zero_grad()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0

    def global_grad_norm(self) -> float:
        """‖∇‖ of the last step over all ranks, before clipping (NaN before the first step)."""
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = self._stage0_grad_norm
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ partitions

    def local_parts(self) -> list[torch.Tensor]:
        """This rank's parameter storage, in the layout the forward pass reads from.

        ZeRO-3: ``p.ds_tensor`` (a flat 1/W partition, zero padding included). Otherwise: the
        whole parameter. Writing into these tensors changes the next forward pass, which is
        what the finite-difference HVP relies on.
        """
        if self.stage == 3:
            return [p.ds_tensor for p in self.params]
        return [p.data for p in self.params]

    @torch.no_grad()
    def fp32_master_parts(self) -> list[torch.Tensor]:
        """This rank's fp32 master weights in the :meth:`local_parts` layout (collective at
        stages 1-2, which assemble them from every rank's fragment).

        In a bf16/fp16 run the optimizer updates fp32 copies of the weights and the forward
        pass reads them rounded to 16 bits; these are the copies. In an fp32 run they are
        :meth:`local_parts` itself.
        """
        parts = self.local_parts()
        if all(t.dtype == torch.float32 for t in parts):
            return parts
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

        stage0 = self._stage0_masters() if self.stage == 0 else {}
        out = []
        for i, (p, part) in enumerate(zip(self.params, parts)):
            if self.stage == 3:
                master = safe_get_local_fp32_param(p)
            elif self.stage == 0:
                master = stage0.get(id(p))
            else:
                master = safe_get_full_fp32_param(p)
            if master is None or master.numel() != part.numel():
                raise RuntimeError(
                    f"parameter {i}: no fp32 master copy of its {part.numel()} local elements "
                    f"in DeepSpeed's {type(self.optimizer).__name__} (ZeRO stage {self.stage})")
            out.append(master.detach().float().reshape(part.shape))
        return out

    def _stage0_masters(self) -> dict[int, torch.Tensor]:
        """Stage 0 in bf16/fp16: DeepSpeed's FP16_UnfusedOptimizer keeps ``fp32_groups``
        parallel to ``fp16_groups`` (it sets no ``_hp_mapping`` for the safe_get helpers)."""
        opt = self.ds.optimizer
        halves, masters = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
        if halves is None or masters is None:
            return {}
        return {id(h): m for hs, ms in zip(halves, masters) for h, m in zip(hs, ms)}

    def release_gathered(self) -> None:
        """ZeRO-3: partition every parameter a pass left gathered, so that the next forward
        all-gathers the current ``p.ds_tensor``.

        Needed before any pass that follows a write into the partitions (finite differences,
        :meth:`load_parts`). Measured here (deepspeed 0.19.8, 2 CPU ranks): on an engine whose
        first pass was a forward+backward, a later no-grad forward left every parameter
        AVAILABLE (its trace expects the backward to reuse them within
        ``stage3_max_reuse_distance``), and the forwards after it ignored writes into the
        partitions: directional scores came out exactly 0.
        """
        release = getattr(self.ds.optimizer, "empty_partition_cache", None)
        if self.stage == 3 and release is not None:
            release()  # the ZeRO-3 optimizer's: partition_all_parameters, without gc.collect

    @torch.no_grad()
    def load_parts(self, parts: list[torch.Tensor]) -> None:
        """Overwrite this rank's :meth:`local_parts` with ``parts`` (same layout), e.g. another
        engine's :meth:`fp32_master_parts`; the next forward pass reads them."""
        mine = self.local_parts()
        if len(parts) != len(mine):
            raise ValueError(f"{len(parts)} parts for an engine with {len(mine)}")
        for i, (dst, src) in enumerate(zip(mine, parts)):
            if dst.numel() != src.numel():
                raise ValueError(f"part {i}: {src.numel()} elements for {dst.numel()}")
            dst.copy_(src.reshape(dst.shape))
        self.release_gathered()

    def local_grads(self) -> list[torch.Tensor]:
        """fp32 copies of this rank's gradient partitions after a backward pass."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            out = []
            for p in self.params:
                g = safe_get_local_grad(p)
                out.append(torch.zeros(p.ds_tensor.numel(), device=p.ds_tensor.device)
                           if g is None else g.detach().float().reshape(-1).clone())
            return out
        from deepspeed.utils import safe_get_full_grad

        out = []
        for p in self.params:
            g = safe_get_full_grad(p) if self.stage > 0 else p.grad
            out.append(torch.zeros_like(p, dtype=torch.float32) if g is None
                       else g.detach().float().clone())
        return out

    def add_to_local_grads(self, deltas: list[torch.Tensor]) -> None:
        """g_local += delta for every parameter (used for the analytic prox gradient)."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            for p, d in zip(self.params, deltas):
                g = safe_get_local_grad(p)
                safe_set_local_grad(p, g.float().reshape(-1) + d.reshape(-1))
        elif self.stage == 0:
            for p, d in zip(self.params, deltas):
                p.grad.add_(d.view_as(p.grad).to(p.grad.dtype))
        else:
            from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

            for p, d in zip(self.params, deltas):
                safe_set_full_grad(p, safe_get_full_grad(p).float() + d.view_as(p))

    def local_numels(self) -> list[int]:
        return [t.numel() for t in self.local_parts()]

    def local_valid_numels(self) -> list[int] | None:
        """How many elements of each local partition are real parameters, not ZeRO-3's zero
        padding (None when every rank holds whole parameters)."""
        if self.stage != 3:
            return None
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        return [max(0, min(p.ds_numel - rank * p.ds_tensor.numel(), p.ds_tensor.numel()))
                for p in self.params]

    def partition_group(self):
        """Process group for sharded dot products: None when every rank holds everything."""
        import torch.distributed as dist

        if self.stage == 3 and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    @contextmanager
    def gathered(self, modifier_rank: int | None = None):
        """All-gather the whole parameters for the duration of the block (ZeRO-3 only)."""
        if self.stage == 3:
            import deepspeed

            self.release_gathered()  # else parameters a pass left gathered are not re-read
            with deepspeed.zero.GatheredParameters(list(self.ds.module.parameters()),
                                                   modifier_rank=modifier_rank):
                yield
        else:
            yield

    @torch.no_grad()
    def copy_params_into(self, target: torch.nn.Module) -> None:
        """Write the whole current parameters into ``target`` (an unpartitioned module with the
        same parameter names); every rank takes part and every rank's target gets them.

        Under ZeRO-3 this all-gathers the partitions ``p.ds_tensor`` directly (rank r holds
        elements ``[r·s, (r+1)·s)`` of the flattened parameter, zero padding at the end) and
        never enters ``GatheredParameters``: measured here, leaving that context re-partitions
        the parameters so that the selector's finite differences, which write into
        ``p.ds_tensor``, no longer reached the forward pass (directional scores lost all
        correlation with per-example gradients).
        """
        mine = dict(target.named_parameters())
        if self.stage != 3:
            for name, p in self.ds.module.named_parameters():
                mine[name].copy_(p.data)
            return
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        for name, p in self.ds.module.named_parameters():
            part = p.ds_tensor.detach().contiguous()
            if world > 1:
                # on the collective's device (NCCL: the GPU; gloo: the CPU, also under offload)
                part = part.to(comm_device())
                flat = torch.empty(part.numel() * world, dtype=part.dtype, device=part.device)
                dist.all_gather_into_tensor(flat, part)
            else:
                flat = part
            mine[name].copy_(flat[:p.ds_numel].view(p.ds_shape))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights as fp32 CPU tensors (every rank takes part; all get it)."""
        with self.gathered():
            return {k: v.detach().float().cpu().clone()
                    for k, v in self.ds.module.state_dict().items()}

    # ------------------------------------------------------------------ checkpoints

    @property
    def adapters_only(self) -> bool:
        """LoRA (``model.lora``): checkpoints hold the adapters and their optimizer state; the
        frozen base is θ0's, rebuilt from the model at load."""
        return self.cfg.model.lora is not None

    def save(self, directory: Path, tag: str) -> None:
        self.ds.save_checkpoint(str(directory), tag=tag, save_latest=False,
                                exclude_frozen_parameters=self.adapters_only)

    def load(self, directory: Path, tag: str) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=tag,
                                          load_module_strict=not self.adapters_only,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")
