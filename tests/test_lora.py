"""LoRA (``model.lora``, peft) on real ZeRO-3 ranks: 2 ranks give the 1-rank losses, only the
adapters train (the base stays θ0 bit for bit), checkpoints hold the adapters and resume the same
trajectory, and the export loads both as a merged model and as a peft adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_config
from tests.distributed import run_ranks
from u2a_dist.config import ConfigError, config_from_dict

LORA = {"name_or_path": "tiny-gpt2", "lora": {"r": 4, "alpha": 8}}
SGD = {"optimizer": "sgd", "lr": 0.5, "steps": 4}  # SGD: see test_engine (Adam amplifies noise)
TOL = 1e-5
IDS = torch.tensor([[5, 17, 99, 120, 33, 2, 250]])


def _cfg(out: Path, **runtime) -> dict:
    return tiny_config(out, model=LORA, unlearn=SGD, runtime={"checkpoint_every": 0, **runtime})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    one = run_ranks(1, "tests.rank_fns:train_report",
                    {"cfg": _cfg(root / "w1", world_size=1), "steps": 4})
    two = run_ranks(2, "tests.rank_fns:train_report",
                    {"cfg": _cfg(root / "w2"), "steps": 4, "export": str(root / "model")})
    split = _cfg(root / "split")
    first = run_ranks(2, "tests.rank_fns:train_report", {"cfg": split, "steps": 2, "save": True})
    second = run_ranks(2, "tests.rank_fns:train_report",
                       {"cfg": split, "steps": 2, "prepare": False})
    return {"one": one[0], "two": two, "first": first[0], "second": second[0], "root": root}


def _theta0() -> dict[str, torch.Tensor]:
    from u2a_dist.models import load_model

    cfg = config_from_dict(tiny_config("unused", model=LORA))
    return {k: v.float() for k, v in load_model(cfg.model, seed=0).state_dict().items()}


def test_two_ranks_give_the_one_rank_losses_and_only_the_adapters_train(runs) -> None:
    one, two = runs["one"], runs["two"]
    assert two[0]["losses"] == two[1]["losses"]
    torch.testing.assert_close(torch.tensor(two[0]["losses"]), torch.tensor(one["losses"]),
                               rtol=TOL, atol=TOL)
    assert one["losses"][-1] < one["losses"][0]
    # the engine partitions the adapters only: 2 × (r × d) per adapted layer of the tiny model
    trainable = sum(full for _, full, _ in two[0]["partitions"])
    theta0 = _theta0()
    assert trainable == sum(v.numel() for k, v in theta0.items() if "lora_" in k) < 10_000
    adapters = [k for k in theta0 if "lora_" in k]
    assert adapters and len(adapters) == 2 * 8  # A and B of c_attn, c_proj, c_fc, mlp.c_proj × 2
    for key, value in theta0.items():
        after = two[0]["state"][key]
        if "lora_" in key:  # every adapter matrix moved
            assert not torch.equal(after, value), key
            torch.testing.assert_close(after, one["state"][key], rtol=1e-4, atol=1e-5)
        else:  # the base is θ0's, bit for bit
            assert torch.equal(after, value), key


def test_checkpoints_hold_the_adapters_and_resume_the_same_trajectory(runs) -> None:
    first, second, two = runs["first"], runs["second"], runs["two"][0]
    assert second["resumed_from"] == 2
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]),
                               torch.tensor(two["losses"]), rtol=1e-6, atol=1e-6)
    for key, value in two["state"].items():
        torch.testing.assert_close(second["state"][key], value, rtol=1e-6, atol=1e-6)
    # what a checkpoint weighs: well under the frozen base's fp32 bytes (it is θ0, rebuilt)
    theta0 = _theta0()
    base_bytes = 4 * sum(v.numel() for k, v in theta0.items() if "lora_" not in k)
    tags = [p for p in (runs["root"] / "split" / "checkpoints").iterdir() if p.is_dir()]
    assert tags
    for tag in tags:
        size = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
        assert size < base_bytes / 2, (tag, size, base_bytes)


def test_the_export_loads_merged_and_as_a_peft_adapter(runs) -> None:
    from peft import PeftModel

    from u2a_dist.models import build_tiny_model

    out, engine_logits = runs["root"] / "model", runs["two"][0]["logits"]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    adapted = PeftModel.from_pretrained(build_tiny_model(0), out / "adapter").eval()
    with torch.no_grad():
        for model in (merged, adapted):
            torch.testing.assert_close(model(input_ids=IDS).logits, engine_logits,
                                       rtol=1e-5, atol=1e-5)
        assert not torch.allclose(build_tiny_model(0).eval()(input_ids=IDS).logits,
                                  engine_logits, atol=1e-4)  # trained, not θ0


def test_u2a_export_of_an_adapter_checkpoint(runs, tmp_path) -> None:
    """``u2a export`` of the split run (its step-2 checkpoint holds the adapters only): the base
    comes from θ0. By default the export is the peft adapter directory, with ``--merge`` a plain
    model; each computes what the run's weights at step 2 compute."""
    from peft import PeftModel

    from u2a_dist.cli import main
    from u2a_dist.models import build_tiny_model, load_model

    adapter, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert main(["export", "--checkpoint", str(runs["root"] / "split"), "--out", str(adapter)]) == 0
    assert main(["export", "--checkpoint", str(runs["root"] / "split"), "--out", str(merged_dir),
                 "--merge"]) == 0
    model = load_model(config_from_dict(tiny_config("x", model=LORA)).model, seed=0)
    model.load_state_dict(runs["first"]["state"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "README.md").is_file()
    assert not (adapter / "model.safetensors").exists()
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter").exists()
    assert not (merged_dir / "adapter_config.json").exists()
    with torch.no_grad():
        want = model.eval()(input_ids=IDS).logits
        for got in (AutoModelForCausalLM.from_pretrained(merged_dir).eval(),
                    PeftModel.from_pretrained(build_tiny_model(0), adapter).eval()):
            torch.testing.assert_close(got(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_lora_settings_are_checked_by_name() -> None:
    with pytest.raises(ConfigError, match="model.lora"):
        config_from_dict(tiny_config("x", model={**LORA, "lora": {"r": 0}}))
    with pytest.raises(ConfigError, match="model.lora.dropout must be 0 with selector"):
        config_from_dict(tiny_config("x", model={**LORA, "lora": {"dropout": 0.1}},
                                     selector={"enabled": True}))


@pytest.mark.slow
@pytest.mark.parametrize("hvp_mode", ["fd", "exact"])
def test_adapter_space_round0_scores_match_an_exact_solve(tmp_path, hvp_mode) -> None:
    """The selector in adapter space (∇J, FD HVPs and the Neumann series over the LoRA
    parameters only, 2 ZeRO-3 ranks) against an independent exact computation on one process in
    float64: exact HVPs by double backward, conjugate gradients to 1e-10 on
    (H + λI + δI) v = ∇J, and s_i = ⟨v, ∇f_i⟩ by per-example autograd. δ and α are fixed so the
    Neumann series converges (GA's Hessian is indefinite: measured here λ ∈ [−21, 21]).

    Scored with per-example gradients, the product's scores are within 2.6e-4 of the exact ones
    (measured); the default directional scores (finite differences along v, the adapters' own
    step FD_REL_STEP_ADAPTERS) within 3.7e-3 (measured; 4.4% with the full model's step).
    ``hvp_mode="exact"``: the product's double-backward HVPs (``selector.hvp: exact``), 2 ranks at
    ZeRO stage 0 (adapters whole on each rank): within 2.6e-4 too (measured; the Neumann
    series' residual, 2.6e-4 after its 9 terms, is the floor of both). Below ZeRO-3 each rank
    holds the whole vector, and inner products once counted it on every rank (per-example
    scores came out 2x at W = 2): this case checks that too."""
    from u2a_dist.data.tokenize import collate
    from u2a_dist.losses import ga_loss, sequence_logps
    from u2a_dist.models import load_model

    lora = {"name_or_path": "tiny-gpt2",
            "lora": {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}}
    sel = {"enabled": True, "top_k": 8, "hessian_batch": 64, "outer_sample": 16,
           "damping": 50.0, "alpha": 0.012, "neumann_terms": 60, "dpo_beta": 0.5,
           "score": "per_example_grad"}
    cfg = tiny_config(tmp_path / "run", model=lora, selector={**sel, "hvp": hvp_mode},
                      runtime={"zero_stage": 3 if hvp_mode == "fd" else 0})
    r = run_ranks(2, "tests.rank_fns:round0_with_inputs",
                  {"cfg": cfg, "also": ("directional",)})[0]

    model = load_model(config_from_dict(cfg).model, seed=0).double().eval()
    model.load_state_dict({k: v.double() for k, v in r["theta"].items()})
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == 2 * (2 * 64 + 192 * 2)  # A, B of both c_attn

    def flat(grads) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in grads])

    def logps(items):
        return sequence_logps(model, collate(items, r["pad_id"]))

    # ∇J at θ0, where the policy is its own reference: DPO on the sampled pairs
    lc, _ = logps(r["chosen"])
    lr, _ = logps(r["rejected"])
    margin = (lc - lc.detach()) - (lr - lr.detach())
    grad_j = flat(torch.autograd.grad(-torch.nn.functional.logsigmoid(0.5 * margin).mean(),
                                      params))
    # exact HVPs of the data term (w uniform on all N: hessian_batch ≥ N) by double backward
    logp, ntok = logps(r["items"])
    g = flat(torch.autograd.grad(ga_loss(logp, ntok).sum() / len(r["items"]), params,
                                 create_graph=True))
    shift = cfg["unlearn"]["prox_lambda"] + sel["damping"]

    def hvp(x: torch.Tensor) -> torch.Tensor:
        return flat(torch.autograd.grad(g @ x, params, retain_graph=True)) + shift * x

    v, res = torch.zeros_like(grad_j), grad_j.clone()
    p, rs = res.clone(), res @ res
    for _ in range(50):  # conjugate gradients: the system is symmetric positive definite here
        ap = hvp(p)
        step = rs / (p @ ap)
        v, res = v + step * p, res - step * ap
        new = res @ res
        if new.sqrt() <= 1e-10 * grad_j.norm():
            break
        p, rs = res + (new / rs) * p, new
    assert float(new.sqrt() / grad_j.norm()) <= 1e-10
    exact = torch.tensor([float(v @ flat(torch.autograd.grad(ga_loss(*logps([item])).sum(),
                                                             params)))
                          for item in r["items"]], dtype=torch.float64)
    scores = r["scores"]

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort().argsort().double()

    a, b = ranks(scores) - ranks(scores).mean(), ranks(exact) - ranks(exact).mean()
    spearman = float((a * b).sum() / (a.norm() * b.norm()))
    rel = float((scores - exact).norm() / exact.norm())
    assert spearman >= 0.999 and rel <= 1e-3, (spearman, rel)
    fd = r["scores_directional"]
    rel_fd = float((fd - exact).norm() / exact.norm())
    assert rel_fd <= 1e-2, rel_fd


def test_a_bf16_lora_run_selects_on_the_fp32_twin_and_trains_only_the_adapters(tmp_path):
    """LoRA in bf16 (model.dtype) with the selector on, 2 ZeRO-3 ranks: round 0 and a
    reweighting round run (on the fp32 twin, docs/design.md §3) and agree on both ranks, every
    adapter moves and the base stays θ0 rounded to bf16, bit for bit."""
    cfg = tiny_config(tmp_path / "run", model={**LORA, "dtype": "bfloat16"},
                      unlearn={**SGD, "steps": 4},
                      selector={"enabled": True, "top_k": 4, "ihvp": "identity", "rounds": 1,
                                "steps_per_round": 2, "hessian_batch": 8, "outer_sample": 8},
                      runtime={"checkpoint_every": 0})
    a, b = run_ranks(2, "tests.rank_fns:half_precision_rounds", {"cfg": cfg})
    for r in (a, b):  # each selection on the fp32 twin holding the adapters' master weights
        assert [x["step"] for x in r["loads"]] == [0, 2]
        assert all(x["equal"] and not x["run"] and x["dtypes"] == ["torch.float32"]
                   for x in r["loads"])
    assert a["round"] == b["round"] == 2 and len(a["losses"]) == 4
    assert list(a["support"]) == list(b["support"]) and len(a["support"]) == 4
    assert torch.equal(a["weights"], b["weights"])
    assert torch.isfinite(torch.tensor(a["losses"])).all()
    theta0 = _theta0()
    for key, value in theta0.items():
        after = a["state"][key]
        if "lora_" in key:
            assert not torch.equal(after, value.to(torch.bfloat16).float()), key
        else:
            assert torch.equal(after, value.to(torch.bfloat16).float()), key
