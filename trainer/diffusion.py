"""The PixArt-α training objective: DDPM with learned sigma and the IDDPM hybrid loss (MSE + VB).

Noise schedule and noising come from diffusers' ``DDPMScheduler``; the variational bound with a learned
interpolated variance (``learned_range``) is not in diffusers and follows Nichol & Dhariwal (2021), as
PixArt-α's public code does: ``loss = mse(eps) + vb * num_timesteps / 1000``, the VB term seeing the
predicted epsilon only through a detached copy, and the decoder NLL at ``t = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

LOG2 = math.log(2.0)


def linear_scheduler(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DDPMScheduler:
    """DDPM with linear betas and a learned (interpolated) variance, as in PixArt-α."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=beta_start,
        beta_end=beta_end,
        variance_type="learned_range",
        prediction_type="epsilon",
    )


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` (data in [-1, 1], 256 bins) under a discretised Gaussian, elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclass(frozen=True)
class LossTerms:
    """Per-sample loss and its parts (batch-shaped tensors)."""

    loss: torch.Tensor
    mse: torch.Tensor
    vb: torch.Tensor


class HybridLoss:
    """``mse`` or IDDPM ``hybrid`` loss for a model that predicts epsilon and variance values (2C channels)."""

    def __init__(self, scheduler: DDPMScheduler, kind: str = "hybrid") -> None:
        if kind not in ("hybrid", "mse"):
            raise ValueError(f"unknown loss {kind!r}: use 'hybrid' or 'mse'")
        self.scheduler = scheduler
        self.kind = kind
        betas = scheduler.betas.double()
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.num_timesteps = len(betas)
        self.log_betas = torch.log(betas)
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.coef_x0 = betas * torch.sqrt(ac_prev) / (1.0 - ac)
        self.coef_xt = (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac)
        self.sqrt_recip_ac = torch.sqrt(1.0 / ac)
        self.sqrt_recipm1_ac = torch.sqrt(1.0 / ac - 1.0)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(like.device)[t].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def __call__(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> LossTerms:
        """Loss terms for ``model_output`` (eps and variance values) at timesteps ``t``; mean over all but batch."""
        channels = x_start.shape[1]
        eps, var_values = model_output.float().split(channels, dim=1)
        dims = list(range(1, x_start.dim()))
        mse = ((noise.float() - eps) ** 2).mean(dim=dims)
        if self.kind == "mse":
            return LossTerms(loss=mse, mse=mse, vb=torch.zeros_like(mse))
        x_start, x_t = x_start.float(), x_t.float()
        min_log = self._at(self.posterior_log_variance, t, x_t)
        max_log = self._at(self.log_betas, t, x_t)
        frac = (var_values + 1.0) / 2.0
        model_log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self._at(self.sqrt_recip_ac, t, x_t) * x_t - self._at(self.sqrt_recipm1_ac, t, x_t) * eps.detach()
        model_mean = self._at(self.coef_x0, t, x_t) * pred_x0 + self._at(self.coef_xt, t, x_t) * x_t
        true_mean = self._at(self.coef_x0, t, x_t) * x_start + self._at(self.coef_xt, t, x_t) * x_t
        kl = normal_kl(true_mean, min_log, model_mean, model_log_variance).mean(dim=dims) / LOG2
        nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance).mean(dim=dims) / LOG2
        vb = torch.where(t == 0, nll, kl) * (self.num_timesteps / 1000.0)
        return LossTerms(loss=mse + vb, mse=mse, vb=vb)
