"""Each loss of docs/design.md §2 against an independent hand computation (plain Python/math)."""

from __future__ import annotations

import math

import pytest
import torch

from u2a_dist.data.tokenize import IGNORE
from u2a_dist.losses import (
    dpo_loss,
    ga_loss,
    label_positions,
    nll,
    npo_loss,
    prox_value,
    token_kl_sum,
    token_logps,
)


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def test_token_logps_masks_prompt_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 1], [IGNORE, 2, 6, IGNORE, IGNORE]])
    logp, ntok = token_logps(logits, labels)
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(4):  # logits[t] predicts labels[t+1]
            y = int(labels[b, t + 1])
            if y != IGNORE:
                total += math.log(_softmax(logits[b, t].tolist())[y])
        expected.append(total)
    assert ntok.tolist() == [3, 2]
    torch.testing.assert_close(logp, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_token_logps_gradient_and_hessian_vector_product_match_the_softmax_formulas():
    """The fused cross-entropy's first and second derivatives (the selector's exact HVP takes
    the second through autograd): for a response position with label y and p = softmax(z),
    ∂ log p_y / ∂z = e_y − p and its Hessian times v is −(p ⊙ v − p (pᵀv)); prompt and padding
    positions contribute nothing."""
    torch.manual_seed(2)
    logits = torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE, 5, IGNORE, 2]])
    v = torch.randn(1, 4, 6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(token_logps(logits, labels)[0].sum(), logits, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * v).sum(), logits)
    for t in range(4):
        y = int(labels[0, t + 1]) if t < 3 else IGNORE
        if y == IGNORE:
            assert grad[0, t].abs().max() == 0 and hvp[0, t].abs().max() == 0
            continue
        p = torch.tensor(_softmax(logits[0, t].tolist()), dtype=torch.float64)
        torch.testing.assert_close(grad[0, t].detach(), torch.eye(6, dtype=torch.float64)[y] - p)
        torch.testing.assert_close(hvp[0, t], -(p * v[0, t] - p * (p @ v[0, t])))


def test_ga_and_nll():
    logp, ntok = torch.tensor([-6.0, -2.0]), torch.tensor([3, 4])
    assert nll(logp, ntok).tolist() == [2.0, 0.5]
    assert ga_loss(logp, ntok).tolist() == [-2.0, -0.5]


def test_npo_loss():
    logp, ref, beta = torch.tensor([-5.0, -9.0]), torch.tensor([-6.0, -6.0]), 0.1
    expected = [(2 / beta) * math.log1p(math.exp(beta * (a - r)))
                for a, r in zip(logp.tolist(), ref.tolist())]
    torch.testing.assert_close(npo_loss(logp, ref, beta), torch.tensor(expected))
    # At θ = θ0 NPO equals (2/β)·log 2.
    assert math.isclose(float(npo_loss(ref, ref, beta)[0]), 2 / beta * math.log(2), rel_tol=1e-6)


def test_retain_kl_is_kl_of_reference_to_policy_over_response_tokens():
    torch.manual_seed(1)
    logits, ref = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE, IGNORE, 2, 3]])
    at = label_positions(labels)  # label_logits' rows: the positions predicting a label
    keep = torch.tensor([True, True])
    kl_sum, count = token_kl_sum(logits[at], ref[at], keep)
    assert int(token_kl_sum(logits[at], ref[at], torch.tensor([False, True]))[1]) == 1
    expected = 0.0
    for t in (1, 2):  # positions predicting labels 2 and 3
        p0, q = _softmax(ref[0, t].tolist()), _softmax(logits[0, t].tolist())
        expected += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p0, q))
    assert int(count) == 2
    assert math.isclose(float(kl_sum), expected, rel_tol=1e-5)


def test_prox_value():
    p = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    r = [torch.tensor([0.0, 2.5]), torch.tensor([[1.0]])]
    assert math.isclose(prox_value(p, r, 0.2), 0.1 * (1 + 0.25 + 4))


def test_dpo_loss_and_rewards():
    pc, pr = torch.tensor([-3.0]), torch.tensor([-5.0])
    rc, rr = torch.tensor([-4.0]), torch.tensor([-4.5])
    beta = 0.5
    loss, wc, wr = dpo_loss(pc, pr, rc, rr, beta)
    margin = beta * ((-3 + 4) - (-5 + 4.5))
    assert math.isclose(float(loss), -math.log(1 / (1 + math.exp(-margin))), rel_tol=1e-6)
    assert math.isclose(float(wc), 0.5) and math.isclose(float(wr), -0.25)


def test_simnpo_against_a_hand_computation():
    """SimNPO through the registry and the inner objective: (2/β)·log(1 + exp(β·logp/|y| + γ))
    computed by hand with math, no reference model, options from unlearn.loss_args."""
    from u2a_dist.config import ConfigError, config_from_dict
    from u2a_dist.losses import LOSSES, InnerObjective

    base = {"data": {"forget": {"path": "builtin:harmful", "schema": "completions"}},
            "selector": {"enabled": False},
            "unlearn": {"loss": "simnpo", "npo_beta": 2.5, "loss_args": {"gamma": 0.5}}}
    cfg = config_from_dict(base).unlearn
    assert "simnpo" in LOSSES and not LOSSES["simnpo"].needs_reference
    logp, ntok = torch.tensor([-12.0, -3.0]), torch.tensor([4, 2])
    objective = InnerObjective(cfg, has_mismatch=False)
    total, ell = objective(logp, ntok, None)
    expected = [2 / 2.5 * math.log1p(math.exp(2.5 * lp / n + 0.5))
                for lp, n in ((-12.0, 4), (-3.0, 2))]
    torch.testing.assert_close(ell, torch.tensor(expected))
    torch.testing.assert_close(total, ell)  # c_f = 1, no mismatch
    cfg = config_from_dict({**base, "unlearn": {"loss": "simnpo", "loss_args": {"beta": 1.0}}})
    ell = InnerObjective(cfg.unlearn, has_mismatch=False)(logp, ntok, None)[1]
    torch.testing.assert_close(ell, 2 * torch.nn.functional.softplus(logp / ntok))
    with pytest.raises(ConfigError, match="unlearn.loss_args"):
        config_from_dict({**base, "unlearn": {"loss": "simnpo", "loss_args": {"delta": 1}}})
