"""The selector's settings, ``selector:`` of a run config (:class:`u2a_dist.config.RunConfig`
holds it, validates it and re-exports the class): apart so that the config module stays short."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class SelectorConfig:
    enabled: bool = True
    dpo_beta: float = 0.1
    ihvp: str = field(default="neumann", metadata={
        "help": "neumann | cg (conjugate gradients: ~sqrt(κ) HVPs where Neumann needs ~κ) | "
                "identity"})
    neumann_terms: int = 20
    neumann_tol: float = 1e-3
    cg_iters: int = field(default=20, metadata={"help": "CG: at most this many HVPs; it stops "
                                                "at ‖r‖/‖∇J‖ ≤ cg_tol"})
    cg_tol: float = 1e-3
    hvp: str = field(default="fd", metadata={
        "help": "fd: Hessian-vector products by central differences of gradients (any ZeRO "
                "stage) | exact: by double backward (runtime.zero_stage 0 only: whole "
                "parameters on every rank, e.g. LoRA adapters on one node)"})
    identity_gamma: float = 1.0
    alpha: Union[float, str] = "auto"
    damping: Union[float, str] = "auto"
    lanczos_steps: int = field(default=20, metadata={"help": "HVPs of the Lanczos estimate of "
        "H's λ_min and λ_max for `auto` damping and alpha (`power_iters`, its old name, read)."})
    fd_eps: Union[float, str] = "auto"
    fd_rel_step: Union[float, str] = field(default="auto", metadata={
        "help": "With fd_eps auto, the finite-difference perturbation ||eps*v|| as a share of the "
                "trainable parameters' RMS; auto: 0.02 (full model), 0.2 with model.lora "
                "(u2a_dist/linalg/hvp.py has the measurements)."})
    hessian_batch: int = 32
    outer_sample: int = field(default=0, metadata={
        "help": "Preference pairs of data.pa drawn (seeded, afresh each round) for ∇J; 0 = all. "
                "∇J costs a forward+backward per pair: a sample is its unbiased estimate."})
    score: str = field(default="directional", metadata={
        "help": "directional | per_example_grad | random: random-k, a seeded random support of "
                "top_k with uniform weights and no reweighting (the peer selection must beat)"})
    score_on: str = field(default="total", metadata={"help": "total | forget | mismatch: top-k "
        "and reweighting by the score's forget part c_f⟨v, ∇ℓ_i⟩ or its mismatch part "
        "c_m⟨v, ∇m_i⟩ alone (BENCHMARKS, Noisy pools), scored from that term's forward passes "
        "only: mismatch skips the negatives' own (long) sequences"})
    normalize: str = field(default="none", metadata={
        "help": "none | cosine: top-k and reweighting by s_i/‖∇f_i‖ (the ranked part's own "
                "gradient with score_on), LESS's cosine up to the common ‖v‖, so a negative does "
                "not rank high for the size of its gradient alone; one backward pass per scored "
                "negative."})
    top_k: int = 64
    check_steps: int = field(default=0, metadata={"help": "`u2a select`: after round 0, this "
        "many steps on each of the top, bottom and a random check_k negatives alone, each from "
        "θ0, and ΔJ of each (u2a_dist/score_check.py); 0 = no check."})
    check_k: int = field(default=0, metadata={"help": "Negatives per checked group; 0 = top_k"})
    candidates: int = field(default=0, metadata={"help": "Round 0 scores a seeded sample of "
        "this many negatives and keeps its top_k (0 = all N): selection's cost capped for a "
        "very large pool (each scored negative costs two forward passes)."})
    eta: float = 1.0
    eta_scale: str = field(default="raw", metadata={
        "help": "raw: the reweighting step is eta·g | max_abs: (eta/max|g|)·g, so no log-weight "
                "moves by more than eta whatever the scale of g (~1/damping: on SmolLM2, eta 50 "
                "on raw scores put all weight on one negative at the first reweighting)."})
    rounds: int = 4
    steps_per_round: int = 25
