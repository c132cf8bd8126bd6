"""Gaussian diffusion (Ho et al. 2020): the forward process, the reverse process, L_simple, the VLB, samplers.

Notation follows the paper: beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s. Timestep index
t = 0..T-1 in code is the paper's t = 1..T. Every schedule constant is computed once in float64 and gathered,
then cast to the data's dtype, so float32 rounding never accumulates through the cumulative product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from axon_shared import progress_bar

from .config import HYBRID_MISSING, DiffusionConfig

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, C, H, W), t (B,)) -> model output (B, C, H, W)


def beta_schedule(
    kind: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, *, s: float = 0.008, max_beta: float = 0.999
) -> Tensor:
    """(T,) float64 betas.

    - "linear": beta_t linear from beta_start to beta_end (Ho et al., section 4: 1e-4 .. 0.02, T = 1000).
    - "cosine": abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), beta_t = min(1 - abar(t)/abar(t-1), 0.999)
      (Nichol & Dhariwal 2021, eq. 17).
    """
    if timesteps <= 0:
        raise ValueError(f"timesteps must be > 0, got {timesteps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if kind == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    raise ValueError(f"unknown beta schedule {kind!r}; use 'linear' or 'cosine'")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x0 | x1) for data on 256 levels scaled to [-1, 1] (Ho et al., eq. 13), element-wise, in nats.

    Each pixel owns the bin [x - 1/255, x + 1/255]; the outermost bins extend to -inf and +inf.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_minus = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_mid = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def _mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


class GaussianDiffusion(nn.Module):
    """The diffusion process around a network `model(x_t, t)`; holds only float64 constants (non-persistent buffers).

    variance: sigma_t^2 of p(x_{t-1} | x_t): "fixedlarge" = beta_t, "fixedsmall" = beta~_t (posterior variance).
    prediction: what the network outputs: "eps" (the paper), "x0", or "v" = sqrt(abar) eps - sqrt(1 - abar) x0.
    """

    def __init__(
        self,
        betas: Tensor,
        *,
        variance: str = "fixedlarge",
        clip_denoised: bool = True,
        prediction: str = "eps",
        loss: str = "simple",
        vlb_weight: float = 0.001,
        loss_weight: str = "uniform",
        min_snr_gamma: float = 5.0,
    ):
        super().__init__()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        if variance not in ("fixedlarge", "fixedsmall"):
            raise ValueError(f"variance must be 'fixedlarge' or 'fixedsmall', got {variance!r}")
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")
        if loss == "hybrid":
            raise ValueError(HYBRID_MISSING)
        if loss not in ("simple", "simple_vlb"):
            raise ValueError(f"loss must be 'simple' or 'simple_vlb', got {loss!r}")
        self.variance, self.clip_denoised, self.prediction = variance, clip_denoised, prediction
        if loss_weight not in ("uniform", "min_snr"):
            raise ValueError(f"loss_weight must be 'uniform' or 'min_snr', got {loss_weight!r}")
        self.loss_type, self.vlb_weight = loss, vlb_weight
        self.loss_weight, self.min_snr_gamma = loss_weight, min_snr_gamma
        self.num_timesteps = T = betas.shape[0]

        betas = betas.double()
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)  # beta~_t (eq. 7)
        # fixedlarge uses beta_t, except at t = 1 where beta~_2 stands in so log p(x0|x1) is not too wide
        # (the original code's choice; it only matters for the likelihood, no noise is added at t = 1)
        large = torch.cat([posterior_variance[1:2], betas[1:]]) if T > 1 else betas
        small_log = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])) if T > 1 else torch.log(betas)
        consts = {
            "betas": betas,
            "abar": abar,
            "abar_prev": abar_prev,
            "abar_ext": torch.cat([torch.ones(1, dtype=torch.float64), abar]),  # abar_ext[t + 1]; index 0 = "t = -1" -> 1
            "snr": abar / (1.0 - abar),  # SNR_t = abar_t / (1 - abar_t)
            "sqrt_abar": abar.sqrt(),
            "sqrt_one_minus_abar": (1.0 - abar).sqrt(),
            "sqrt_recip_abar": (1.0 / abar).sqrt(),
            "sqrt_recipm1_abar": (1.0 / abar - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance": small_log,
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            "model_variance": large if variance == "fixedlarge" else posterior_variance,
            "model_log_variance": torch.log(large) if variance == "fixedlarge" else small_log,
        }
        for name, value in consts.items():
            self.register_buffer(name, value, persistent=False)

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> GaussianDiffusion:
        betas = beta_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
        return cls(
            betas,
            variance=config.variance,
            clip_denoised=config.clip_denoised,
            prediction=config.prediction,
            loss=config.loss,
            vlb_weight=config.vlb_weight,
            loss_weight=config.loss_weight,
            min_snr_gamma=config.min_snr_gamma,
        )

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _check(self, x: Tensor, t: Tensor) -> None:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        if t.dtype.is_floating_point:
            raise TypeError(f"t must hold integer timesteps, got {t.dtype}")
        # the range needs the values: checked in eager mode, skipped inside a compiled graph (train.compile)
        if t.numel() and not torch.compiler.is_compiling() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got min {int(t.min())} max {int(t.max())}")

    @staticmethod
    def _gather(const: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """const[t] in float64, cast to x's dtype, shaped (B, 1, 1, ...) to broadcast over x."""
        return const[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    # ---- forward process ----------------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (eq. 4, the closed form of q(x_t | x0))."""
        self._check(x0, t)
        assert noise.shape == x0.shape, (noise.shape, x0.shape)
        return self._gather(self.sqrt_abar, t, x0) * x0 + self._gather(self.sqrt_one_minus_abar, t, x0) * noise

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance, log-variance of q(x_t | x0)."""
        self._check(x0, t)
        mean = self._gather(self.sqrt_abar, t, x0) * x0
        var = self._gather(1.0 - self.abar, t, x0).expand_as(x0)
        return mean, var, self._gather(torch.log(1.0 - self.abar), t, x0).expand_as(x0)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0) = N(mu~_t, beta~_t I)  (eqs. 6-7): mean, variance, (clipped) log-variance."""
        self._check(x_t, t)
        assert x0.shape == x_t.shape, (x0.shape, x_t.shape)
        mean = self._gather(self.posterior_mean_coef1, t, x_t) * x0 + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        var = self._gather(self.posterior_variance, t, x_t).expand_as(x_t)
        return mean, var, self._gather(self.posterior_log_variance, t, x_t).expand_as(x_t)

    # ---- parameterisations --------------------------------------------------------------------------------------
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps  (eq. 4 solved for x0)."""
        return self._gather(self.sqrt_recip_abar, t, x_t) * x_t - self._gather(self.sqrt_recipm1_abar, t, x_t) * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (self._gather(self.sqrt_recip_abar, t, x_t) * x_t - x0) / self._gather(self.sqrt_recipm1_abar, t, x_t)

    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "eps":
            return self.predict_x0_from_eps(x_t, t, model_output)
        if self.prediction == "x0":
            return model_output
        # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return self._gather(self.sqrt_abar, t, x_t) * x_t - self._gather(self.sqrt_one_minus_abar, t, x_t) * model_output

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self._gather(self.sqrt_abar, t, x0) * noise - self._gather(self.sqrt_one_minus_abar, t, x0) * x0

    # ---- reverse process ----------------------------------------------------------------------------------------
    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool | None = None) -> dict[str, Tensor]:
        """p_theta(x_{t-1} | x_t) = N(mu~_t(x_t, x0_hat), sigma_t^2 I) with x0_hat from the model (eq. 11 for eps)."""
        self._check(x_t, t)
        if model_output.shape != x_t.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} must have the shape of x_t {tuple(x_t.shape)}")
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        x0_hat = self.predict_x0(model_output, x_t, t)
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(x0_hat, x_t, t)
        var = self._gather(self.model_variance, t, x_t).expand_as(x_t)
        log_var = self._gather(self.model_log_variance, t, x_t).expand_as(x_t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "x0": x0_hat}

    def p_sample(self, model_output: Tensor, x_t: Tensor, t: Tensor, noise: Tensor, clip_denoised: bool | None = None) -> Tensor:
        """x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at the last step t = 1 (Algorithm 2, line 4).

        A pure function of the model's output: no network call, no random draw.
        """
        assert noise.shape == x_t.shape, (noise.shape, x_t.shape)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
        capture_every: int = 0,
    ) -> tuple[Tensor, list[tuple[int, Tensor]]]:
        """Algorithm 2: x_T ~ N(0, I); for t = T..1: x_{t-1} = p_sample(model(x_t, t), x_t, t, z). Returns (x_0, trajectory).

        trajectory holds (t, x_t) every `capture_every` steps (and the final x_0 at t = -1) when capture_every > 0.
        """
        x = torch.randn(tuple(shape), generator=generator, device=device)
        trajectory: list[tuple[int, Tensor]] = []
        steps = progress_bar(range(self.num_timesteps - 1, -1, -1), enabled=progress, desc="DDPM sampling", total=self.num_timesteps)
        for step in steps:
            if capture_every and (step + 1) % capture_every == 0:
                trajectory.append((step + 1, x.cpu()))
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=device)
            noise = torch.randn(x.shape, generator=generator, device=device)
            x = self.p_sample(model(x, t), x, t, noise)
        if capture_every:
            trajectory.append((0, x.cpu()))
        return x, trajectory

    # ---- DDIM (Song et al. 2021) -------------------------------------------------------------------------------
    def ddim_step(
        self,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        t_prev: Tensor,
        eta: float,
        noise: Tensor | None = None,
        clip_denoised: bool | None = None,
    ) -> Tensor:
        """x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_hat + sigma z  (Song et al., eq. 12),
        sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'}); t' = -1 means abar = 1.

        With clipping, eps_hat is re-derived from the clipped x0_hat so the two terms stay consistent.
        """
        self._check(x_t, t)
        if t_prev.shape != t.shape or bool((t_prev >= t).any()) or int(t_prev.min()) < -1:
            raise ValueError("t_prev must have t's shape, satisfy -1 <= t_prev < t")
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        x0_hat = self.predict_x0(model_output, x_t, t)
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        eps_hat = model_output if (self.prediction == "eps" and not clip) else self.predict_eps_from_x0(x_t, t, x0_hat)
        abar_t = self._gather(self.abar, t, x_t)
        abar_prev = self._gather(self.abar_ext, t_prev + 1, x_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
        x_prev = abar_prev.sqrt() * x0_hat + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps_hat
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            x_prev = x_prev + sigma * noise
        return x_prev

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        timesteps: Sequence[int] | int = 50,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
        capture_every: int = 0,
    ) -> tuple[Tensor, list[tuple[int, Tensor]]]:
        """DDIM sampling along a decreasing timestep list (an int n means `ddim_timesteps(T, n)`)."""
        steps = ddim_timesteps(self.num_timesteps, timesteps) if isinstance(timesteps, int) else list(timesteps)
        if any(b >= a for a, b in zip(steps, steps[1:])) or steps[0] >= self.num_timesteps or steps[-1] < 0:
            raise ValueError(f"DDIM timesteps must be strictly decreasing within [0, {self.num_timesteps - 1}], got {steps[:5]}...")
        x = torch.randn(tuple(shape), generator=generator, device=device)
        trajectory: list[tuple[int, Tensor]] = []
        pairs = list(zip(steps, steps[1:] + [-1]))
        for i, (step, prev) in enumerate(progress_bar(pairs, enabled=progress, desc="DDIM sampling")):
            if capture_every and i % capture_every == 0:
                trajectory.append((step + 1, x.cpu()))
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=device)
            t_prev = torch.full_like(t, prev)
            noise = torch.randn(x.shape, generator=generator, device=device) if eta > 0 else None
            x = self.ddim_step(model(x, t), x, t, t_prev, eta, noise)
        if capture_every:
            trajectory.append((0, x.cpu()))
        return x, trajectory

    # ---- losses ------------------------------------------------------------------------------------------------
    def vlb_term_bpd(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """(B,) one term of the VLB in bits per dimension (eq. 5):
        L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 1, and L_0 = -log p(x0 | x1) at t = 1.
        The likelihood uses the unclipped x0_hat (the bound holds for either choice)."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """(B,) L_T = KL(q(x_T | x0) || N(0, I)) in bits per dimension (no parameters; ~0 for a good schedule)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return _mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)

    def training_loss(
        self, model: ModelFn, x0: Tensor, t: Tensor | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Algorithm 1: t ~ U{1..T}, eps ~ N(0, I), L_simple = || eps - eps_theta(x_t, t) ||^2  (eq. 14).

        loss="simple_vlb" adds vlb_weight * T * L_t (bits/dim), an unbiased one-sample estimate of vlb_weight * L_vlb.
        This is not Nichol & Dhariwal's L_hybrid (2021, section 3.1): with our fixed variances L_t only re-weights the
        same squared error (eq. 12: w_t ||eps - eps_theta||^2 + a constant), and the mean gets the gradient of both
        terms (L_hybrid learns the variances and stops the mean's gradient in L_vlb). Returns (scalar loss, per-sample
        terms).
        """
        batch = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (batch,), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t)
        mse = _mean_flat((self.training_target(x0, noise, t) - output.float()) ** 2)
        terms = {"mse": mse.detach(), "t": t}
        loss = mse if self.loss_weight == "uniform" else self.min_snr_weight(t) * mse
        if self.loss_type == "simple_vlb":
            vlb = self.vlb_term_bpd(output.float(), x0, x_t, t)
            terms["vlb"] = vlb.detach()
            loss = loss + self.vlb_weight * self.num_timesteps * vlb
        return loss.mean(), terms

    def min_snr_weight(self, t: Tensor) -> Tensor:
        """(B,) Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
        Strategy", section 3.4): the weight of the x0 error, min(SNR_t, gamma), expressed for the network's target.
        The eps error is the x0 error times SNR_t, so w = min(SNR_t, gamma) / SNR_t; the v error is it times
        SNR_t + 1, so w = min(SNR_t, gamma) / (SNR_t + 1); for x0, w = min(SNR_t, gamma). With eps, the weight is 1 where
        SNR_t <= gamma (the noisy steps) and gamma / SNR_t below: the nearly clean steps, whose targets conflict least
        with the others', count less. Not in the DDPM paper (a deviation, off by default)."""
        snr = self.snr[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            return (clipped / snr).float()
        if self.prediction == "v":
            return (clipped / (snr + 1.0)).float()
        return clipped.float()

    @torch.no_grad()
    def bits_per_dim(
        self, model: ModelFn, x0: Tensor, *, n_timesteps: int | None = None, exact_head: int = 20, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """The negative VLB, -log p(x0) <= L_T + sum_{t>1} L_{t-1} + L_0, in bits per dimension (paper Table 2), per image.

        n_timesteps=None (or >= T - 1) sums every term exactly (T network calls per image). Otherwise the KL terms
        of the first `exact_head` timesteps (where the VLB weights, and so the terms, are largest) are summed exactly
        and the rest are estimated by stratified sampling: n strata of equal width, one uniform t per stratum
        weighted by the stratum's width, an unbiased estimate. L_0 and L_T are always exact. Returns per-image
        tensors {"total", "prior", "decoder", "kl"} of shape (B,).
        """
        T = self.num_timesteps
        device = x0.device
        batch = x0.shape[0]
        head = max(1, min(exact_head + 1, T))
        if n_timesteps is None or n_timesteps >= T - head:
            ts, weights = torch.arange(1, T), torch.ones(T - 1, dtype=torch.float64)
        else:
            edges = torch.linspace(head, T, n_timesteps + 1, dtype=torch.float64)
            lo, hi = edges[:-1].floor().long(), edges[1:].floor().long()
            widths = hi - lo
            keep = widths > 0
            lo, widths = lo[keep], widths[keep]
            sampled = lo + (torch.rand(lo.shape[0], generator=generator, dtype=torch.float64) * widths).long()
            ts = torch.cat([torch.arange(1, head), sampled])
            weights = torch.cat([torch.ones(head - 1, dtype=torch.float64), widths.double()])
        kl = torch.zeros(batch, dtype=torch.float64, device=device)

        def term(step: int) -> Tensor:
            t = torch.full((batch,), step, dtype=torch.long, device=device)
            noise = torch.randn(x0.shape, generator=generator, device="cpu").to(device)
            x_t = self.q_sample(x0, t, noise)
            return self.vlb_term_bpd(model(x_t, t).float(), x0, x_t, t)

        for step, weight in zip(ts.tolist(), weights.tolist()):
            kl += weight * term(step).double()
        decoder = term(0).double()
        prior = self.prior_bpd(x0).double()
        return {"total": prior + kl + decoder, "prior": prior, "decoder": decoder, "kl": kl}


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """Decreasing timestep list for n-step DDIM. "leading": [0, k, 2k, ...] reversed with k = T // n (diffusers'
    default, [980, 960, ..., 0] for T=1000, n=50); "trailing": round(T - i T/n) - 1 (ends at T-1)."""
    if not 0 < steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "leading":
        ratio = num_timesteps // steps
        return [i * ratio for i in range(steps)][::-1]
    if spacing == "trailing":
        return [round(num_timesteps - i * num_timesteps / steps) - 1 for i in range(steps)]
    raise ValueError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")
