"""The IDDPM hybrid loss against a scalar reference written out here with plain math."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.diffusion import HybridLoss, linear_scheduler

T = 1000


def reference_terms(eps, v, x0, xt, noise, t):
    """MSE and VB for one sample, element by element in float64 (formulas of Ho et al. / Nichol & Dhariwal)."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    ac, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        ac.append(prod)
    ac_prev = 1.0 if t == 0 else ac[t - 1]
    post_var = [betas[i] * (1 - (1.0 if i == 0 else ac[i - 1])) / (1 - ac[i]) for i in range(T)]
    min_log = math.log(post_var[1] if t == 0 else post_var[t])
    max_log = math.log(betas[t])
    c0 = betas[t] * math.sqrt(ac_prev) / (1 - ac[t])
    ct = (1 - ac_prev) * math.sqrt(1 - betas[t]) / (1 - ac[t])
    mse = sum((n - e) ** 2 for n, e in zip(noise, eps, strict=True)) / len(eps)
    terms = []
    for e, vv, a, b in zip(eps, v, x0, xt, strict=True):
        frac = (vv + 1) / 2
        logvar = frac * max_log + (1 - frac) * min_log
        pred_x0 = math.sqrt(1 / ac[t]) * b - math.sqrt(1 / ac[t] - 1) * e
        mean = c0 * pred_x0 + ct * b
        true_mean = c0 * a + ct * b
        if t > 0:
            kl = 0.5 * (
                -1 + logvar - min_log + math.exp(min_log - logvar) + (true_mean - mean) ** 2 * math.exp(-logvar)
            )
            terms.append(kl / math.log(2))
        else:
            inv_std = math.exp(-0.5 * logvar)

            def cdf(x):
                return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

            plus, minus = cdf(inv_std * (a - mean + 1 / 255)), cdf(inv_std * (a - mean - 1 / 255))
            logp = math.log(max(plus - minus, 1e-12))
            terms.append(-logp / math.log(2))
    return mse, sum(terms) / len(terms)


@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
def test_hybrid_loss_matches_the_reference(t):
    gen = torch.Generator().manual_seed(t)
    x0 = torch.rand(1, 2, 2, 2, generator=gen) * 2 - 1
    noise = torch.randn(1, 2, 2, 2, generator=gen)
    out = torch.randn(1, 4, 2, 2, generator=gen) * 0.5
    out[:, 2:] = out[:, 2:].clamp(-1, 1)
    sched = linear_scheduler()
    tt = torch.tensor([t])
    xt = sched.add_noise(x0, noise, tt)
    terms = HybridLoss(sched)(out, x0, xt, noise, tt)
    mse, vb = reference_terms(
        out[0, :2].flatten().tolist(),
        out[0, 2:].flatten().tolist(),
        x0.flatten().tolist(),
        xt.flatten().tolist(),
        noise.flatten().tolist(),
        t,
    )
    assert terms.mse.item() == pytest.approx(mse, rel=1e-5)
    assert terms.vb.item() == pytest.approx(vb, rel=2e-3, abs=1e-6)
    assert terms.loss.item() == pytest.approx(mse + vb, rel=2e-3)


def test_vb_trains_only_the_variance_and_mse_only_epsilon():
    sched = linear_scheduler()
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([3, 700])
    out = torch.randn(2, 8, 4, 4, requires_grad=True)
    terms = HybridLoss(sched)(out, x0, sched.add_noise(x0, noise, t), noise, t)
    (grad_vb,) = torch.autograd.grad(terms.vb.sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms.mse.sum(), out)
    assert grad_vb[:, :4].abs().max() == 0 and grad_vb[:, 4:].abs().max() > 0
    assert grad_mse[:, 4:].abs().max() == 0 and grad_mse[:, :4].abs().max() > 0


def test_mse_option_and_unknown_kind():
    sched = linear_scheduler()
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    t = torch.tensor([5])
    terms = HybridLoss(sched, "mse")(torch.randn(1, 8, 2, 2), x0, sched.add_noise(x0, noise, t), noise, t)
    assert terms.vb.item() == 0 and terms.loss.item() == terms.mse.item()
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        HybridLoss(sched, "l1")
