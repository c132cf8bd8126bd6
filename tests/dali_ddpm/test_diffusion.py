"""The diffusion process against diffusers 0.42.1 (DDPMScheduler, DDIMScheduler) and against direct math."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.testing import assert_close

from dali_ddpm.diffusion import GaussianDiffusion, beta_schedule, ddim_timesteps

T = 1000
# Our constants are float64; diffusers re-derives beta_t = 1 - abar_t / abar_{t-1} in float32 inside step(),
# which differs from the float64 beta_t by up to ~5e-4 per step (measured here: <= 1.2e-4). 1e-3 stays far below the
# differences a wrong formula makes (checked by the negative tests below).
TOL = dict(atol=1e-3, rtol=0)
PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _pair(variance: str, clip: bool, prediction: str = "eps"):
    ours = GaussianDiffusion(beta_schedule("linear", T), variance=variance, clip_denoised=clip, prediction=prediction)
    theirs = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        variance_type={"fixedsmall": "fixed_small", "fixedlarge": "fixed_large"}[variance],
        clip_sample=clip,
        prediction_type=PRED[prediction],
    )
    return ours, theirs


def test_betas_and_abar_match_diffusers():
    ours = GaussianDiffusion(beta_schedule("linear", T))
    theirs = DDPMScheduler(num_train_timesteps=T)
    assert_close(ours.betas.float(), theirs.betas, atol=1e-8, rtol=0)
    assert_close(ours.abar.float(), theirs.alphas_cumprod, atol=2e-6, rtol=1e-5)


def test_cosine_schedule_equals_squaredcos_cap_v2():
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
    ours = beta_schedule("cosine", T)
    assert ours.dtype == torch.float64
    assert_close(ours.float(), theirs, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ours.float(), beta_schedule("linear", T).float(), atol=1e-3)


def test_add_noise_equals_q_sample():
    ours, theirs = _pair("fixedsmall", True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 2, 10, 100, 250, 499, 500, 501, 750, 900, 990, 997, 998, 999, 42])
    # float32 cumprod in diffusers vs our float64: ~3e-6
    assert_close(ours.q_sample(x0, t, noise), theirs.add_noise(x0, noise, t), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variance", ["fixedsmall", "fixedlarge"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_one_step_equals_ddpm_scheduler_step(variance, clip, prediction):
    ours, theirs = _pair(variance, clip, prediction)
    for step in [999, 900, 500, 100, 10, 1, 0]:
        g = torch.Generator().manual_seed(step)
        x_t = torch.randn(4, 3, 8, 8, generator=g) * 1.5  # wide enough that clipping x0_hat bites
        output = torch.randn(x_t.shape, generator=g)
        expected = theirs.step(output, step, x_t, generator=torch.Generator().manual_seed(123)).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(123))  # the same draw diffusers makes
        got = ours.p_sample(output, x_t, torch.full((4,), step), noise)
        assert_close(got, expected, **TOL, msg=lambda m, step=step: f"t={step}: {m}")


def test_wrong_variance_is_detected():
    """The negative control: fixedsmall vs diffusers' fixed_large must differ beyond the tolerance."""
    ours, _ = _pair("fixedsmall", False)
    _, theirs = _pair("fixedlarge", False)
    x_t, output = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    expected = theirs.step(output, 1, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
    got = ours.p_sample(output, x_t, torch.full((4,), 1), torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1)))
    assert (got - expected).abs().max() > 3 * TOL["atol"]


@pytest.mark.parametrize("variance", ["fixedsmall", "fixedlarge"])
def test_full_ancestral_loop_matches_diffusers(variance):
    """1000 steps with a fixed 'network' eps(x, t) = 0.3 tanh(x) + t/T and the same noise (diffusers draws
    its noise from the generator it is given; we draw from an identically seeded one): the chains agree."""
    ours, theirs = _pair(variance, True)
    fake = lambda x, t: 0.3 * torch.tanh(x) + t.float().view(-1, 1, 1, 1) / T
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    for step in range(T - 1, -1, -1):
        t = torch.full((2,), step)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
        x = ours.p_sample(fake(x, t), x, t, noise)
        y = theirs.step(fake(y, t), step, y, generator=torch.Generator().manual_seed(step)).prev_sample
    assert_close(x, y, **TOL)
    assert x.abs().max() > 0.1


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_ddim_scheduler(clip, eta):
    ours = GaussianDiffusion(beta_schedule("linear", T), clip_denoised=clip)
    theirs = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True)
    theirs.set_timesteps(50)
    steps = ddim_timesteps(T, 50)
    assert steps == theirs.timesteps.tolist() and steps[:2] == [980, 960] and steps[-1] == 0
    fake = lambda x, t: 0.3 * torch.tanh(x) + t.float().view(-1, 1, 1, 1) / T
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=gen) * 1.5
    y = x.clone()
    for step, prev in zip(steps, steps[1:] + [-1]):
        t = torch.full((2,), step)
        noise = torch.randn(x.shape, generator=gen)
        x = ours.ddim_step(fake(x, t), x, t, torch.full((2,), prev), eta, noise)
        y = theirs.step(fake(y, t), step, y, eta=eta, use_clipped_model_output=clip, variance_noise=noise).prev_sample
    assert_close(x, y, **TOL)
    assert x.abs().max() > 0.1  # a real comparison, not two zero tensors


def test_forward_process_reaches_standard_normal():
    d = GaussianDiffusion(beta_schedule("linear", T))
    x0 = torch.rand(512, 1, 16, 16, generator=torch.Generator().manual_seed(0)).round() * 2 - 1  # far from N(0, I)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_T = d.q_sample(x0, torch.full((512,), T - 1), noise)
    assert abs(x_T.mean().item()) < 0.01 and abs(x_T.std().item() - 1) < 0.01
    # the two-sided per-pixel correlation with x0 is sqrt(abar_T) ~ 6e-3
    assert d.sqrt_abar[-1].item() < 7e-3
    assert d.prior_bpd(x0).max().item() < 1e-4


def test_posterior_matches_direct_gaussian_product():
    """q(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1})."""
    d = GaussianDiffusion(beta_schedule("linear", T))
    x0 = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    x_t = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    betas = beta_schedule("linear", T)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    a, b, ap = alphas[t].view(-1, 1, 1, 1), betas[t].view(-1, 1, 1, 1), abar[t - 1].view(-1, 1, 1, 1)
    precision = a / b + 1 / (1 - ap)
    var = 1 / precision
    mean = var * (a.sqrt() / b * x_t + ap.sqrt() / (1 - ap) * x0)
    got_mean, got_var, got_log_var = d.q_posterior(x0, x_t, t)
    assert_close(got_mean, mean, atol=1e-10, rtol=1e-9)
    assert_close(got_var, var.expand_as(x_t), atol=1e-12, rtol=1e-9)
    assert_close(got_log_var, var.log().expand_as(x_t), atol=1e-9, rtol=1e-9)


def test_posterior_mean_is_the_regression_of_x_tminus1_on_x_t():
    """Monte Carlo: sample x_{t-1} ~ q(.|x0), x_t ~ q(.|x_{t-1}); E[x_{t-1} | x_t] is linear in x_t with
    the slope posterior_mean_coef2, and the residual variance is beta~_t."""
    d = GaussianDiffusion(beta_schedule("linear", T))
    g = torch.Generator().manual_seed(0)
    t = 200
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    x_prev = d.sqrt_abar[t - 1] * x0 + d.sqrt_one_minus_abar[t - 1] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = (1 - d.betas[t]).sqrt() * x_prev + d.betas[t].sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    cov = torch.cov(torch.stack([x_t, x_prev]))
    slope = cov[0, 1] / cov[0, 0]
    residual = cov[1, 1] - cov[0, 1] ** 2 / cov[0, 0]
    assert abs(slope.item() - d.posterior_mean_coef2[t].item()) < 5e-3
    assert abs(residual.item() / d.posterior_variance[t].item() - 1) < 2e-2


def test_bad_timesteps_raise_clear_errors():
    d = GaussianDiffusion(beta_schedule("linear", 10))
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 9\]"):
        d.q_sample(x, torch.tensor([0, 10]), x)
    with pytest.raises(ValueError, match="must have shape"):
        d.q_sample(x, torch.tensor([1]), x)
    with pytest.raises(TypeError, match="integer"):
        d.q_sample(x, torch.tensor([0.5, 1.0]), x)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        beta_schedule("quadratic", 10)


def test_training_loss_is_l_simple():
    d = GaussianDiffusion(beta_schedule("linear", T))
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    t, noise = torch.tensor([0, 10, 500, 999]), torch.randn(4, 1, 4, 4)
    model = lambda x, tt: 0.5 * x
    loss, _ = d.training_loss(model, x0, t, noise)
    x_t = d.q_sample(x0, t, noise)
    assert_close(loss, ((noise - 0.5 * x_t) ** 2).mean())


def test_vlb_and_bits_per_dim():
    """With the true posterior mean (the ideal 'network' x0 prediction), every KL term vanishes; the stratified
    estimate is unbiased and the exact sum is what it estimates."""
    d = GaussianDiffusion(beta_schedule("linear", 50, 1e-4, 0.2), variance="fixedsmall", prediction="eps")
    x0 = torch.randint(0, 256, (3, 1, 4, 4)).float() / 127.5 - 1
    oracle = lambda x_t, t: d.predict_eps_from_x0(x_t, t, x0)
    out = d.bits_per_dim(oracle, x0, generator=torch.Generator().manual_seed(0))
    assert out["kl"].abs().max() < 1e-6
    assert (out["decoder"] > 0).all() and out["decoder"].max() < 8
    blind = lambda x_t, t: torch.zeros_like(x_t)
    x0 = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1
    exact = torch.stack([d.bits_per_dim(blind, x0, generator=torch.Generator().manual_seed(s))["kl"] for s in range(30)])
    estimates = torch.stack(
        [d.bits_per_dim(blind, x0, n_timesteps=9, exact_head=5, generator=torch.Generator().manual_seed(100 + s))["kl"] for s in range(30)]
    )
    assert (exact.mean(0) > 1).all()
    assert_close(estimates.mean(0), exact.mean(0), rtol=0.1, atol=0)


def test_discretized_decoder_sums_to_one():
    from dali_ddpm.diffusion import discretized_gaussian_log_likelihood

    levels = torch.arange(256).float() / 127.5 - 1
    for mean, log_scale in [(0.0, math.log(0.01)), (0.3, math.log(0.2)), (-0.99, math.log(0.05))]:
        p = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)).exp()
        assert abs(p.sum().item() - 1) < 1e-4


# ---- the variational bound, term by term, against torch.distributions and a brute-force sum over the 256 bins ----
# The reference quantities below are rebuilt in float64 from the betas alone (Ho et al. 2020, eqs. 4, 6, 7), so a
# mistake in the constants GaussianDiffusion precomputes cannot hide in both sides of a comparison.
PAPER_BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # Ho et al., section 4
SHORT_BETAS = torch.linspace(1e-3, 0.2, 20, dtype=torch.float64)  # T = 20: L_T and every KL term are far from 0
SCHEDULES = {"paper": PAPER_BETAS, "short": SHORT_BETAS}
LN2 = math.log(2.0)


def _abar(betas):
    """(abar_t, abar_{t-1}) for code index t = 0..T-1 (paper t = 1..T), abar_0 := 1 (eq. 4's notation)."""
    abar = torch.cumprod(1.0 - betas, 0)
    return abar, torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])


def _col(values, t):
    return values[t].view(-1, 1, 1, 1)


def _posterior_mean(betas, x0, x_t, t):
    """mu~_t(x_t, x0) (eq. 7)."""
    abar, abar_prev = _abar(betas)
    b, a, ab, abp = _col(betas, t), _col(1.0 - betas, t), _col(abar, t), _col(abar_prev, t)
    return abp.sqrt() * b / (1 - ab) * x0 + a.sqrt() * (1 - abp) / (1 - ab) * x_t


def _posterior_variance(betas):
    """beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (eq. 7); 0 at the first step."""
    abar, abar_prev = _abar(betas)
    return (1 - abar_prev) / (1 - abar) * betas


def _reverse_variance(betas, variance):
    """sigma_t^2 of p(x_{t-1} | x_t) (section 3.2): beta_t ("fixedlarge") or beta~_t ("fixedsmall"). At t = 1 (the
    decoder) both use beta~_2, as Ho et al.'s released code does (beta~_1 = 0; the README's "beta~_2 at t=1")."""
    sigma2 = betas.clone() if variance == "fixedlarge" else _posterior_variance(betas)
    sigma2[0] = _posterior_variance(betas)[1]
    return sigma2


def _levels(shape, generator):
    """8-bit images scaled to [-1, 1], with both edge levels (-1 and 1, whose bins reach to -inf and +inf) present."""
    x0 = torch.randint(0, 256, shape, generator=generator).double() / 127.5 - 1
    x0[:, :, 0, 0], x0[:, :, 0, 1] = -1.0, 1.0
    return x0


def _decoder_nll_bits(x0, mean, std):
    """-log p(x0 | x1) in bits per dim (eq. 13) by brute force: the probability of each of the 256 bins is the mass
    N(mean, std^2) puts between the bin's edges (midpoints between levels; the outer edges are -inf and +inf),
    integrated with torch.distributions.Normal.cdf; each pixel reads the bin of its own level."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    inf = torch.tensor([math.inf], dtype=torch.float64)
    edges = torch.cat([-inf, (levels[:-1] + levels[1:]) / 2, inf])  # (257,)
    cdf = torch.distributions.Normal(mean.unsqueeze(-1), std.unsqueeze(-1)).cdf(edges)  # (..., 257)
    probs = cdf[..., 1:] - cdf[..., :-1]  # (..., 256)
    assert_close(probs.sum(-1), torch.ones_like(mean), atol=1e-12, rtol=0)  # a distribution over the 256 levels
    index = ((x0 + 1) * 127.5).round().long()
    assert_close(levels[index], x0, atol=1e-6, rtol=0)  # float32 levels are within 3e-8 of the exact ones
    true_bin = probs.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert bool((true_bin > 1e-10).all())  # far from the 1e-12 floor of the code under test
    return -true_bin.log().flatten(1).mean(1) / LN2


@pytest.mark.parametrize("variance", ["fixedsmall", "fixedlarge"])
@pytest.mark.parametrize("schedule", ["paper", "short"])
def test_vlb_kl_terms_equal_torch_distributions(variance, schedule):
    """L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) (eq. 5) for t > 1 (code index t >= 1), against torch.distributions.kl_divergence
    of the two Gaussians built here: q = N(mu~_t(x_t, x0), beta~_t) (eqs. 6-7), p = N(mu~_t(x_t, x0_hat), sigma_t^2)
    with x0_hat from the network's eps (eq. 4 solved for x0). Catches the KL's direction reversed and its mean term
    scaled by the wrong variance (both only visible when sigma_t^2 != beta~_t: fixedlarge), a wrong sigma_t^2, and a
    wrong mean on either side."""
    betas = SCHEDULES[schedule]
    T = betas.shape[0]
    d = GaussianDiffusion(betas, variance=variance, prediction="eps")
    t = torch.tensor([1, 2, 3, 5, T // 4, T // 2, T - 2, T - 1])
    g = torch.Generator().manual_seed(0)
    x0 = _levels((t.shape[0], 1, 4, 4), g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps_hat = noise + 0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # an imperfect network
    abar, _ = _abar(betas)
    x_t = _col(abar, t).sqrt() * x0 + (1 - _col(abar, t)).sqrt() * noise  # eq. 4
    x0_hat = (x_t - (1 - _col(abar, t)).sqrt() * eps_hat) / _col(abar, t).sqrt()
    q = torch.distributions.Normal(_posterior_mean(betas, x0, x_t, t), _col(_posterior_variance(betas), t).sqrt().expand_as(x0))
    p = torch.distributions.Normal(_posterior_mean(betas, x0_hat, x_t, t), _col(_reverse_variance(betas, variance), t).sqrt().expand_as(x0))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).mean(1) / LN2
    got = d.vlb_term_bpd(eps_hat, x0, x_t, t)
    assert_close(got, expected, atol=1e-10, rtol=1e-8)
    assert bool((expected > 1e-3).all())  # every term is far from 0: the comparison has something to compare


@pytest.mark.parametrize("variance", ["fixedsmall", "fixedlarge"])
@pytest.mark.parametrize("schedule", ["paper", "short"])
def test_vlb_decoder_term_equals_brute_force_over_256_bins(variance, schedule):
    """L_0 = -log p(x0 | x1), the discretised Gaussian decoder (eq. 13), against `_decoder_nll_bits`: the mass of
    N(x0_hat, sigma_1^2) over each pixel's bin, x0_hat the network's denoised estimate. Catches the decoder's mean
    set to x_1 instead of x0_hat, a wrong scale (10x too wide, or the variance used as the standard deviation),
    the bins' width and the edge bins."""
    betas = SCHEDULES[schedule]
    d = GaussianDiffusion(betas, variance=variance, prediction="eps")
    t = torch.zeros(6, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    x0 = _levels((6, 3, 4, 4), g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps_hat = noise + 0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    abar = _abar(betas)[0][0]
    x_1 = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    x0_hat = (x_1 - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    std = _reverse_variance(betas, variance)[0].sqrt()
    expected = _decoder_nll_bits(x0, x0_hat, std.expand_as(x0))
    got = d.vlb_term_bpd(eps_hat, x0, x_1, t)
    assert_close(got, expected, atol=1e-9, rtol=1e-8)
    # the mean matters: x_1 differs from x0_hat by about one decoder standard deviation
    assert float((x_1 - x0_hat).abs().mean()) > 0.5 * float(std)


@pytest.mark.parametrize("schedule", ["paper", "short"])
def test_prior_term_equals_torch_distributions(schedule):
    """L_T = KL(q(x_T | x0) || N(0, I)) with q(x_T | x0) = N(sqrt(abar_T) x0, 1 - abar_T) (eq. 4)."""
    betas = SCHEDULES[schedule]
    d = GaussianDiffusion(betas)
    x0 = _levels((3, 1, 4, 4), torch.Generator().manual_seed(2))
    abar_T = _abar(betas)[0][-1]
    q = torch.distributions.Normal(abar_T.sqrt() * x0, (1 - abar_T).sqrt().expand_as(x0))
    prior = torch.distributions.Normal(torch.zeros_like(x0), torch.ones_like(x0))
    expected = torch.distributions.kl_divergence(q, prior).flatten(1).mean(1) / LN2
    assert_close(d.prior_bpd(x0), expected, atol=1e-12, rtol=1e-8)


@pytest.mark.parametrize("variance", ["fixedsmall", "fixedlarge"])
def test_bits_per_dim_is_the_sum_of_the_independent_terms(variance):
    """`bits_per_dim` (every term exact) in float32, the path the reported bits/dim take, against the float64 sum
    L_T + sum_{t>1} L_{t-1} + L_0 built above. The 'network' predicts x0 as f(t), independent of x_t: then
    mu~_t(x_t, x0) - mu~_t(x_t, f(t)) = coef1_t (x0 - f(t)) and the decoder's mean is f(0), so every term is free of
    the noise draws and the comparison is exact. Catches a term left out, counted twice or read at the wrong t, and
    every mutation the term-wise tests catch."""
    betas = SHORT_BETAS
    T = betas.shape[0]
    d = GaussianDiffusion(betas, variance=variance, prediction="x0")
    g = torch.Generator().manual_seed(3)
    x0 = _levels((2, 1, 4, 4), g).float()
    wobble = torch.randn(T, *x0.shape, generator=g) * 0.05
    f = (x0 + wobble).clamp(-1, 1)  # (T, B, C, H, W): the 'network's' x0 prediction at each t
    model = lambda x_t, t: f[t, torch.arange(x_t.shape[0])]
    got = d.bits_per_dim(model, x0, generator=torch.Generator().manual_seed(0))

    x0d, fd = x0.double(), f.double()
    abar, abar_prev = _abar(betas)
    sigma2 = _reverse_variance(betas, variance)
    kl = torch.zeros(x0.shape[0], dtype=torch.float64)
    for step in range(1, T):
        coef1 = abar_prev[step].sqrt() * betas[step] / (1 - abar[step])
        q = torch.distributions.Normal(coef1 * x0d, _posterior_variance(betas)[step].sqrt().expand_as(x0d))
        p = torch.distributions.Normal(coef1 * fd[step], sigma2[step].sqrt().expand_as(x0d))
        kl += torch.distributions.kl_divergence(q, p).flatten(1).mean(1) / LN2
    decoder = _decoder_nll_bits(x0d, fd[0], sigma2[0].sqrt().expand_as(x0d))
    q_T = torch.distributions.Normal(abar[-1].sqrt() * x0d, (1 - abar[-1]).sqrt().expand_as(x0d))
    prior = torch.distributions.kl_divergence(q_T, torch.distributions.Normal(0.0, 1.0)).flatten(1).mean(1) / LN2
    tol = dict(atol=1e-4, rtol=1e-4)  # float32 against float64
    assert_close(got["kl"], kl, **tol)
    assert_close(got["decoder"], decoder, **tol)
    assert_close(got["prior"], prior, **tol)
    assert_close(got["total"], prior + kl + decoder, **tol)
    assert bool((kl > 1).all() and (decoder > 1).all() and (prior > 1e-3).all())


@pytest.mark.parametrize("variance", ["fixedsmall", "fixedlarge"])
def test_kl_term_is_eq12_weighted_squared_error_and_simple_vlb_adds_it(variance):
    """Eq. 12: with a fixed variance sigma_t^2, L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - eps_theta||^2
    + C_t (C_t: the variance mismatch, 0 for fixedsmall), per dimension here and in bits. Then loss="simple_vlb" is
    mean(mse + vlb_weight * T * L_{t-1}) by that formula; "hybrid" (which needs learned variances) is refused."""
    betas = beta_schedule("linear", 100, 1e-4, 0.2)
    d = GaussianDiffusion(betas, variance=variance, prediction="eps", clip_denoised=False, loss="simple_vlb", vlb_weight=0.01)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (4, 1, 6, 6), generator=g).float() / 127.5 - 1
    noise, eps_theta = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 7, 50, 99])
    x_t = d.q_sample(x0, t, noise)
    abar, _ = _abar(betas)
    sigma2 = _reverse_variance(betas, variance)[t]
    weight = betas[t] ** 2 / (2 * sigma2 * (1 - betas[t]) * (1 - abar[t]))
    beta_tilde = _posterior_variance(betas)[t]
    constant = 0.5 * (torch.log(sigma2 / beta_tilde) + beta_tilde / sigma2 - 1)  # KL of two Gaussians with equal means
    mse = ((noise - eps_theta) ** 2).double().mean(dim=(1, 2, 3))
    expected_bits = (weight * mse + constant) / math.log(2)
    assert_close(d.vlb_term_bpd(eps_theta, x0, x_t, t).double(), expected_bits, rtol=1e-4, atol=1e-6)

    loss, _ = d.training_loss(lambda x, s: eps_theta, x0, t=t, noise=noise)
    assert_close(loss.double(), (mse + 0.01 * 100 * expected_bits).mean(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="learned variances"):
        GaussianDiffusion(betas, loss="hybrid")


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_training_loss_targets_x0_and_v_equal_diffusers(prediction):
    """L_simple with the other two parameterisations: the target is x0 itself, or diffusers' `get_velocity`
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022), at early, middle and late t."""
    ours, theirs = _pair("fixedlarge", True, prediction)
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1
    noise, output = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    target = x0 if prediction == "x0" else theirs.get_velocity(x0, noise, t)
    loss, terms = ours.training_loss(lambda x_t, s: output, x0, t, noise)
    assert_close(terms["mse"], ((target - output) ** 2).mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)
    assert_close(loss, ((target - output) ** 2).mean(), atol=1e-5, rtol=1e-5)


def test_ddim_timesteps_trailing_equals_diffusers_and_the_step_count_is_checked():
    """ "trailing" spacing is DDIMScheduler's timestep_spacing="trailing" (it ends at T - 1); n = T steps is every
    timestep; n = 0 and n > T are refused."""
    for n in (7, 50, 333):
        theirs = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        theirs.set_timesteps(n)
        assert ddim_timesteps(T, n, "trailing") == theirs.timesteps.tolist()
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1)) == ddim_timesteps(10, 10, "trailing")
    assert ddim_timesteps(10, 1) == [0] and ddim_timesteps(10, 1, "trailing") == [9]  # one step: x_T straight to x_0
    for bad in (0, 11):
        with pytest.raises(ValueError, match=r"DDIM steps must be in \[1, 10\]"):
            ddim_timesteps(10, bad)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(10, 5, "linspace")


@pytest.mark.parametrize("betas", [[0.1, 1.0], [0.1, 1.5], [0.0, 0.1], [-0.1, 0.1], [[0.1, 0.2]]])
def test_betas_outside_the_open_unit_interval_are_refused(betas):
    """beta_t = 1 makes abar_T = 0 (x0 unrecoverable, 1 / abar infinite); beta_t = 0 makes beta~_1 = 0 (log 0)."""
    with pytest.raises(ValueError, match=r"1-D tensor with values in \(0, 1\)"):
        GaussianDiffusion(torch.tensor(betas, dtype=torch.float64))


def test_bits_per_dim_with_enough_timesteps_is_the_exact_sum():
    """n_timesteps >= T - (exact_head + 1) leaves nothing to sample: the result is the exact sum, with the same noise
    draws (a noise-dependent 'network' would see any extra draw from the generator)."""
    d = GaussianDiffusion(beta_schedule("linear", 50, 1e-4, 0.2), variance="fixedsmall")
    x0 = torch.randint(0, 256, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1
    blind = lambda x_t, t: 0.5 * x_t
    exact = d.bits_per_dim(blind, x0, exact_head=5, generator=torch.Generator().manual_seed(1))
    for n in (44, 45, 1000):  # T - head = 50 - 6 = 44
        got = d.bits_per_dim(blind, x0, n_timesteps=n, exact_head=5, generator=torch.Generator().manual_seed(1))
        assert torch.equal(got["total"], exact["total"]), n
    sampled = d.bits_per_dim(blind, x0, n_timesteps=43, exact_head=5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(sampled["total"], exact["total"])


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_sample_loops_equal_the_diffusers_scheduler_loops(sampler, eta):
    """`p_sample_loop` (Algorithm 2) and `ddim_sample_loop` against DDPMScheduler / DDIMScheduler stepped over the
    same timesteps from the same x_T and the same generator (one draw per noisy step on both sides), with the
    trajectory: x_t captured every k steps, labelled with the paper's t, then x_0 labelled 0."""
    steps_total = 100
    ours = GaussianDiffusion(beta_schedule("linear", steps_total), variance="fixedlarge", clip_denoised=True)
    fake = lambda x, t: 0.3 * torch.tanh(x) + t.float().view(-1, 1, 1, 1) / steps_total
    shape, every = (2, 1, 4, 4), 3
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(shape, generator=gen)
    expected_trajectory = []
    if sampler == "ddpm":
        got, trajectory = ours.p_sample_loop(fake, shape, generator=torch.Generator().manual_seed(0), capture_every=every)
        theirs = DDPMScheduler(num_train_timesteps=steps_total, variance_type="fixed_large", clip_sample=True)
        for step in range(steps_total - 1, -1, -1):
            if (step + 1) % every == 0:
                expected_trajectory.append((step + 1, y))
            y = theirs.step(fake(y, torch.full((2,), step)), step, y, generator=gen).prev_sample
    else:
        got, trajectory = ours.ddim_sample_loop(fake, shape, 10, eta=eta, generator=torch.Generator().manual_seed(0), capture_every=every)
        theirs = DDIMScheduler(num_train_timesteps=steps_total, clip_sample=True, set_alpha_to_one=True)
        theirs.set_timesteps(10)
        assert theirs.timesteps.tolist() == ddim_timesteps(steps_total, 10) == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
        for i, step in enumerate(theirs.timesteps.tolist()):
            if i % every == 0:
                expected_trajectory.append((step + 1, y))
            out = fake(y, torch.full((2,), step))
            y = theirs.step(out, step, y, eta=eta, use_clipped_model_output=True, generator=gen).prev_sample
    expected_trajectory.append((0, y))
    assert_close(got, y, **TOL)
    assert [t for t, _ in trajectory] == [t for t, _ in expected_trajectory]
    for (t, x), (_, x_ref) in zip(trajectory, expected_trajectory):
        assert_close(x, x_ref, **TOL, msg=lambda m, t=t: f"trajectory at t={t}: {m}")
    assert got.abs().max() > 0.1


def test_stratified_bits_per_dim_weights_cover_every_term_once():
    """A 'network' (x0-prediction x0 - delta_t, fixedsmall) whose every KL term is the same k nats per dimension: then
    any stratified draw must give exactly (T - 1) k / ln 2 bits, which holds only if the strata's weights sum to the
    T - 1 - head terms they stand for; and it costs exactly head - 1 + n_timesteps + 1 network calls."""
    betas = beta_schedule("linear", 50, 1e-4, 0.2)
    d = GaussianDiffusion(betas, variance="fixedsmall", prediction="x0")
    abar, abar_prev = _abar(betas)
    coef1 = abar_prev.sqrt() * betas / (1 - abar)
    k = 0.01  # nats per dimension per term: KL = coef1^2 delta^2 / (2 beta~) when the variances are equal
    delta = (2 * k * _posterior_variance(betas)).sqrt() / coef1
    x0 = torch.randint(0, 256, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1
    calls = []

    def model(x_t, t):
        calls.append(int(t[0]))
        return x0 - delta[t].float().view(-1, 1, 1, 1)

    for n_timesteps, seed in [(9, 0), (9, 1), (13, 2), (40, 3), (2, 4), (1, 5)]:  # strata narrower and wider than the head
        calls.clear()
        got = d.bits_per_dim(model, x0, n_timesteps=n_timesteps, exact_head=5, generator=torch.Generator().manual_seed(seed))
        assert_close(got["kl"], torch.full((2,), 49 * k / LN2, dtype=torch.float64), rtol=1e-4, atol=0)
        assert len(calls) == 5 + n_timesteps + 1 and calls[:5] == [1, 2, 3, 4, 5] and calls[-1] == 0


def test_cosine_schedule_at_an_odd_number_of_steps_equals_diffusers():
    """T + 1 grid points of the cosine abar, at an odd T too (where T | 1 would equal T)."""
    for steps in (999, 7):
        theirs = DDPMScheduler(num_train_timesteps=steps, beta_schedule="squaredcos_cap_v2").betas
        assert_close(beta_schedule("cosine", steps).float(), theirs, atol=1e-6, rtol=1e-5)


def test_ddim_bad_timesteps_and_bad_previous_steps_are_refused():
    """ddim_sample_loop names the valid range; ddim_step refuses t_prev of another shape, t_prev >= t (equal
    included: a step must go back in time) and t_prev < -1; eta > 0 without noise is refused."""
    d = GaussianDiffusion(beta_schedule("linear", 10))
    model = lambda x, t: torch.zeros_like(x)
    for bad in ([9, 9, 3], [10, 5, 0], [5, 3, -1]):
        with pytest.raises(ValueError, match=r"strictly decreasing within \[0, 9\], got"):
            d.ddim_sample_loop(model, (1, 1, 2, 2), bad)
    with pytest.raises(ValueError, match=r"got \[9, 9, 8, 7, 6\]\.\.\.$"):  # the first five steps
        d.ddim_sample_loop(model, (1, 1, 2, 2), [9, 9, 8, 7, 6, 5, 4])
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([5, 5])
    for t_prev in (torch.tensor([3]), torch.tensor([5, 3]), torch.tensor([6, 3]), torch.tensor([-2, 3])):
        with pytest.raises(ValueError, match="t_prev must have t's shape, satisfy -1 <= t_prev < t"):
            d.ddim_step(torch.zeros_like(x), x, t, t_prev, 0.0)
    with pytest.raises(ValueError, match="needs noise"):
        d.ddim_step(torch.zeros_like(x), x, t, torch.tensor([3, -1]), 0.5)


def test_mismatched_shapes_are_refused():
    """x0, x_t and the noise must share one shape (a broadcast would silently mix pixels of different images)."""
    d = GaussianDiffusion(beta_schedule("linear", 10))
    t = torch.tensor([3, 4])
    with pytest.raises(AssertionError):
        d.q_posterior(torch.zeros(2, 1, 4, 5), torch.zeros(2, 1, 4, 4), t)
    with pytest.raises(AssertionError):
        d.q_sample(torch.zeros(2, 1, 4, 4), t, torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="must have the shape of x_t"):
        d.p_mean_variance(torch.zeros(2, 1, 4, 5), torch.zeros(2, 1, 4, 4), t)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weighting_uses_diffusers_snr(prediction):
    """Min-SNR-gamma (Hang et al. 2023): each sample's squared error weighted by min(SNR_t, 5) / SNR_t (eps),
    min(SNR_t, 5) / (SNR_t + 1) (v) or min(SNR_t, 5) (x0), with SNR_t from diffusers' `compute_snr` on the same
    schedule. For eps, the noisiest steps (SNR_t <= 5) keep weight 1 and the cleanest get gamma / SNR_t << 1."""
    from diffusers.training_utils import compute_snr

    ours, theirs = _pair("fixedlarge", True, prediction)
    weighted = GaussianDiffusion(beta_schedule("linear", T), prediction=prediction, loss_weight="min_snr", min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1
    noise, output = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 100, 500, 999])
    _, terms = ours.training_loss(lambda x_t, s: output, x0, t, noise)
    loss, _ = weighted.training_loss(lambda x_t, s: output, x0, t, noise)
    snr = compute_snr(theirs, t).double()
    weight = snr.clamp(max=5.0) / {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
    assert_close(loss.double(), (weight * terms["mse"].double()).mean(), rtol=1e-5, atol=1e-7)
    if prediction == "eps":
        assert weight[-2:].tolist() == [1.0, 1.0] and weight[0] < 1e-3
    with pytest.raises(ValueError, match="loss_weight"):
        GaussianDiffusion(beta_schedule("linear", T), loss_weight="snr")
