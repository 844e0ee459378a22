"""Objectives: known answers, agreement with the Diffusers schedulers that sample them, and tiny training runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_tread
from diffusers import DDPMScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch.distributions import Normal, kl_divergence

from diffusers_tread import TreadDiTPipeline
from diffusers_tread.objectives import (
    OBJECTIVES,
    DDPMObjective,
    EDMObjective,
    FlowObjective,
    Objective,
    TrainingInputs,
    discretized_gaussian_log_likelihood,
    get_objective,
    normal_kl,
)

NAMES = sorted(OBJECTIVES)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are op-overhead bound: one thread is as fast on an idle machine and ~10x faster on a busy one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def data(batch_size: int = 4, channels: int = 2, size: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch_size, channels, size, size, generator=gen(seed)) * 2 - 1


def model_output(objective: Objective, x0: torch.Tensor, seed: int = 1) -> torch.Tensor:
    shape = (x0.shape[0], objective.model_out_channels(x0.shape[1]), *x0.shape[2:])
    return torch.randn(shape, generator=gen(seed))


# --- registry, config ---------------------------------------------------------------------------------------------


def test_get_objective():
    assert set(OBJECTIVES) == {"ddpm", "flow", "edm"}
    for name in NAMES:
        objective = get_objective(name)
        assert isinstance(objective, OBJECTIVES[name]) and objective.name == name
        config = objective.config()
        assert config["name"] == name
        assert json.loads(json.dumps(config)) == config
    assert get_objective("flow", logit_mean=0.5).config() == {
        "name": "flow",
        "logit_mean": 0.5,
        "logit_std": 1.0,
        "num_train_timesteps": 1000,
    }
    assert get_objective("edm").config()["p_std"] == 1.2
    assert [get_objective(name).model_out_channels(4) for name in ("ddpm", "flow", "edm")] == [8, 4, 4]
    with pytest.raises(ValueError, match=r"Unknown objective 'sit'.*\['ddpm', 'edm', 'flow'\]"):
        get_objective("sit")


# --- generic contract ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_training_inputs_use_the_generator(name):
    objective, x0 = get_objective(name), data()
    first, again, other = (objective.training_inputs(x0, generator=gen(seed)) for seed in (0, 0, 1))
    for field in ("model_input", "timestep", "noise"):
        torch.testing.assert_close(getattr(first, field), getattr(again, field), rtol=0, atol=0)
        assert not torch.equal(getattr(first, field), getattr(other, field))
    assert first.model_input.shape == x0.shape and first.timestep.shape == (x0.shape[0],)
    # Without a generator the global RNG is used.
    torch.manual_seed(3)
    global_rng = objective.training_inputs(x0)
    torch.manual_seed(3)
    torch.testing.assert_close(objective.training_inputs(x0).model_input, global_rng.model_input, rtol=0, atol=0)


def usual_scalar_loss(objective: Objective, out: torch.Tensor, x0: torch.Tensor, inputs: TrainingInputs):
    """Each objective's textbook scalar loss, computed independently of its per-element map."""
    if isinstance(objective, FlowObjective):
        return F.mse_loss(out, inputs.noise - x0)
    if isinstance(objective, EDMObjective):
        # D from the sampler's own preconditioning; weight from EDM Table 1.
        sigma = inputs.sigma.view(-1, 1, 1, 1)
        denoised = objective.make_scheduler().precondition_outputs(inputs.noisy_sample, out, sigma)
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        return (weight * (denoised - x0) ** 2).mean()
    return ddpm_hybrid_loss_reference(out, x0, inputs)


def ddpm_hybrid_loss_reference(out, x0, inputs):
    """DiT's loss (guided-diffusion ``training_losses``, MSE + learned sigma): mean over the batch of
    ``mean_flat(mse) + vb``, with vb from torch.distributions and the alphas of Diffusers' DDPMScheduler."""
    channels = x0.shape[1]
    eps, v = out[:, :channels], out[:, channels:]
    abar = DDPMScheduler(beta_schedule="linear").alphas_cumprod.double()
    terms = []
    for i, t in enumerate(inputs.t.tolist()):
        a_t, a_prev = abar[t], (abar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - a_t / a_prev
        x_t = inputs.noisy_sample[i].double()
        coef_x0, coef_xt = beta * a_prev.sqrt() / (1 - a_t), (1 - a_prev) * (1 - beta).sqrt() / (1 - a_t)
        if t > 0:
            posterior_var = beta * (1 - a_prev) / (1 - a_t)
        else:  # beta-tilde_0 = 0 is clipped to beta-tilde_1 (guided-diffusion)
            posterior_var = (1 - abar[1] / abar[0]) * (1 - abar[0]) / (1 - abar[1])
        x0_pred = (x_t - (1 - a_t).sqrt() * eps[i].double()) / a_t.sqrt()
        frac = (v[i].double() + 1) / 2
        model_std = (frac * beta.log() + (1 - frac) * posterior_var.log()).mul(0.5).exp()
        model = Normal(coef_x0 * x0_pred + coef_xt * x_t, model_std)
        if t > 0:
            vb = kl_divergence(Normal(coef_x0 * x0[i].double() + coef_xt * x_t, posterior_var.sqrt()), model)
        else:
            x = x0[i].double()
            upper = torch.where(x > 0.999, torch.ones_like(x), model.cdf(x + 1 / 255))
            lower = torch.where(x < -0.999, torch.zeros_like(x), model.cdf(x - 1 / 255))
            vb = -(upper - lower).log()
        mse = ((inputs.noise[i].double() - eps[i].double()) ** 2).mean()
        terms.append(mse + vb.mean() / math.log(2))
    return torch.stack(terms).mean().float()


@pytest.mark.parametrize("name", NAMES)
def test_per_element_loss_mean_is_the_usual_loss(name):
    objective, x0 = get_objective(name), data(batch_size=6)
    inputs = objective.training_inputs(x0, generator=gen())
    if name == "ddpm":
        inputs.t[:2] = torch.tensor([0, 1])  # cover the decoder term and the first KL term
        inputs = ddpm_inputs_at(objective, x0, inputs.t, inputs.noise)
    out = model_output(objective, x0)
    loss_map = objective.per_element_loss(out, x0, inputs)
    assert loss_map.shape == x0.shape and loss_map.dtype == torch.float32
    torch.testing.assert_close(loss_map.mean(), usual_scalar_loss(objective, out, x0, inputs), rtol=1e-4, atol=1e-6)


def ddpm_inputs_at(objective: DDPMObjective, x0, t, noise) -> TrainingInputs:
    abar = objective.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    return TrainingInputs(model_input=x_t, timestep=t, noisy_sample=x_t, noise=noise, t=t)


@pytest.mark.parametrize("name", NAMES)
def test_denoised_and_gradients(name):
    objective, x0 = get_objective(name), data()
    inputs = objective.training_inputs(x0, generator=gen())
    out = model_output(objective, x0).requires_grad_()
    assert objective.denoised(out, inputs).shape == x0.shape
    objective.per_element_loss(out, x0, inputs).mean().backward()
    assert torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


# --- DDPM ---------------------------------------------------------------------------------------------------------


def test_ddpm_noising_matches_scheduler():
    objective, x0 = DDPMObjective(), data()
    scheduler = objective.make_scheduler()
    inputs = objective.training_inputs(x0, generator=gen())
    assert inputs.timestep.dtype == torch.int64 and torch.equal(inputs.timestep, inputs.t)
    assert 0 <= inputs.t.min() and inputs.t.max() < 1000
    torch.testing.assert_close(objective.alphas_cumprod.float(), scheduler.alphas_cumprod)
    torch.testing.assert_close(inputs.model_input, scheduler.add_noise(x0, inputs.noise, inputs.t))
    # q(x_t | x0) coefficients, by hand at t = 0 and t = 999 (DDPM Eq. 4)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert objective.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert objective.alphas_cumprod[-1].item() == pytest.approx(torch.prod(1 - betas).item())
    ts = torch.randint(0, 1000, (20000,), generator=gen())
    assert abs(ts.float().mean().item() - 499.5) < 10  # uniform t
    # The learned-variance model's x0 estimate is the scheduler's.
    out = model_output(objective, x0)
    step = scheduler.step(out[:1], int(inputs.t[0]), inputs.model_input[:1], generator=gen())
    torch.testing.assert_close(objective.denoised(out, inputs)[:1], step.pred_original_sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [1, 2, 10, 250, 999])
def test_ddpm_learned_range_variance_matches_scheduler(t):
    """Train and sample read v the same way: iDDPM Eq. 15 == DDPMScheduler._get_variance("learned_range") (a log-
    variance). At t = 0 the scheduler adds no noise, so its unclipped log(beta-tilde_0 = 0) never matters."""
    objective, scheduler = DDPMObjective(), DDPMObjective().make_scheduler()
    v = torch.linspace(-1.5, 1.5, 13)
    expected = scheduler._get_variance(t, predicted_variance=v)
    torch.testing.assert_close(
        objective.model_log_variance(v, torch.tensor([t])).view(-1), expected, rtol=1e-4, atol=0
    )
    # v = -1 is the posterior variance beta-tilde_t, v = +1 is beta_t
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    beta_tilde = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
    ends = objective.model_log_variance(torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.tensor([t]))
    torch.testing.assert_close(ends.view(-1).exp(), torch.stack([beta_tilde, betas[t]]))


def test_normal_kl_known_answers():
    mean, logvar = torch.randn(5, generator=gen(0)), torch.randn(5, generator=gen(1))
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(5))
    mean2, logvar2 = torch.randn(5, generator=gen(2)), torch.randn(5, generator=gen(3))
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(mean2, (0.5 * logvar2).exp()))
    torch.testing.assert_close(normal_kl(mean, logvar, mean2, logvar2), expected)
    # closed form: KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert kl.item() == pytest.approx(math.log(2) + 2 / 8 - 0.5)


def test_discretized_gaussian_log_likelihood_known_answers():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # 8-bit data in [-1, 1]
    mean, log_scale = torch.tensor(0.3, dtype=torch.float64), torch.tensor(math.log(0.2), dtype=torch.float64)
    log_probs = discretized_gaussian_log_likelihood(bins, mean, log_scale)
    normal = Normal(mean, log_scale.exp())
    half_bin = 1 / 255
    direct = normal.cdf(bins + half_bin) - normal.cdf(bins - half_bin)
    direct[0], direct[-1] = normal.cdf(bins[0] + half_bin), 1 - normal.cdf(bins[-1] - half_bin)
    torch.testing.assert_close(log_probs.exp(), direct)
    torch.testing.assert_close(log_probs.exp().sum(), torch.tensor(1.0, dtype=torch.float64))  # a distribution
    # Far tails stay finite (log_ndtr for the edge bins, a floor for the inner ones).
    far = discretized_gaussian_log_likelihood(bins, torch.tensor(50.0, dtype=torch.float64), log_scale)
    assert torch.isfinite(far).all() and far[-1] > -1e-6


def test_ddpm_exact_model_has_zero_kl():
    """Exact eps and v = -1 (the true posterior variance) make the VB term vanish for t > 0: only mse and, at t = 0,
    the decoder NLL remain."""
    objective, x0 = DDPMObjective(), data()
    t = torch.tensor([0, 1, 500, 999])
    noise = torch.randn(x0.shape, generator=gen())
    inputs = ddpm_inputs_at(objective, x0, t, noise)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    loss = objective.per_element_loss(out, x0, inputs)
    torch.testing.assert_close(loss[1:], torch.zeros_like(loss[1:]), rtol=0, atol=1e-4)
    assert (loss[0] > 0).all()
    torch.testing.assert_close(objective.denoised(out, inputs), x0, rtol=1e-4, atol=1e-4)


# --- flow ---------------------------------------------------------------------------------------------------------


def test_flow_interpolant_and_velocity():
    objective, x0 = FlowObjective(), data()
    inputs = objective.training_inputs(x0, generator=gen())
    t = inputs.t.view(-1, 1, 1, 1)
    torch.testing.assert_close(inputs.model_input, (1 - t) * x0 + t * inputs.noise)
    torch.testing.assert_close(inputs.timestep, inputs.t * 1000)  # FlowMatchEulerDiscreteScheduler: sigma * 1000
    velocity = inputs.noise - x0
    assert objective.per_element_loss(velocity, x0, inputs).abs().max() == 0
    torch.testing.assert_close(objective.denoised(velocity, inputs), x0)
    # known answer: x0 = 1, noise = -1 at t = 0.25 -> x_t = 0.5, v = -2
    one = torch.ones(1, 1, 1, 1)
    t = torch.tensor([0.25])
    known = TrainingInputs(model_input=0.5 * one, timestep=1000 * t, noisy_sample=0.5 * one, noise=-one, t=t)
    assert objective.per_element_loss(-2 * one, one, known).item() == 0
    assert objective.denoised(-2 * one, known).item() == pytest.approx(1.0)


def test_flow_logit_normal_times():
    for mean, std in ((0.0, 1.0), (0.5, 0.6)):
        inputs = FlowObjective(logit_mean=mean, logit_std=std).training_inputs(torch.zeros(20000, 1, 1, 1), gen())
        logit = torch.logit(inputs.t.double())
        assert abs(logit.mean().item() - mean) < 0.03 and abs(logit.std().item() - std) < 0.03


# --- EDM ----------------------------------------------------------------------------------------------------------


def test_edm_preconditioning_table_1():
    objective = EDMObjective()
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = objective.preconditioning(sigma)
    # sigma = 0.5 = sigma_data: c_skip = 1/2, c_out = 0.25 / sqrt(0.5), c_in = 1 / sqrt(0.5), c_noise = ln(0.5) / 4
    assert [c[1].item() for c in (c_skip, c_out, c_in, c_noise)] == pytest.approx(
        [0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5), math.log(0.5) / 4]
    )
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    assert objective.loss_weight(torch.tensor(0.5)).item() == pytest.approx(8.0)  # (0.25 + 0.25) / 0.0625
    torch.testing.assert_close(objective.loss_weight(sigma), 1 / c_out**2)  # lambda = 1 / c_out^2 (EDM Eq. 8)

    # The sampler applies exactly the same preconditioning.
    scheduler = objective.make_scheduler()
    x, raw = torch.randn(2, 3, generator=gen(0)), torch.randn(2, 3, generator=gen(1))
    for i, s in enumerate(sigma.float()):
        torch.testing.assert_close(scheduler.precondition_inputs(x, s), c_in[i].float() * x)
        torch.testing.assert_close(scheduler.precondition_noise(s).view(()), c_noise[i].float())
        torch.testing.assert_close(
            scheduler.precondition_outputs(x, raw, s), c_skip[i].float() * x + c_out[i].float() * raw
        )


def test_edm_training_inputs():
    objective, x0 = EDMObjective(), data()
    inputs = objective.training_inputs(x0, generator=gen())
    sigma = inputs.sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(inputs.noisy_sample, x0 + sigma * inputs.noise)
    torch.testing.assert_close(inputs.model_input, inputs.noisy_sample / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(inputs.timestep, inputs.sigma.log() / 4)
    # The raw output F that makes D = x0 has zero loss.
    c_skip, c_out, _, _ = objective.preconditioning(sigma)
    exact = (x0 - c_skip * inputs.noisy_sample) / c_out
    assert objective.per_element_loss(exact, x0, inputs).max() < 1e-8
    # ln sigma ~ N(-1.2, 1.2^2)
    log_sigma = objective.training_inputs(torch.zeros(20000, 1, 1, 1), gen()).sigma.log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.03 and abs(log_sigma.std().item() - 1.2) < 0.03


# --- train/sample agreement through the pipeline -----------------------------------------------------------------


class PerfectModel:
    """Turns a tiny transformer into the exact denoiser of a one-point data set ``target``, reading its inputs with the
    objective's *training* conventions (the inverse of ``training_inputs``), and records what the pipeline passed."""

    def __init__(self, objective: Objective, target: torch.Tensor):
        self.objective, self.target, self.calls = objective, target, []
        self.transformer = tiny_tread(in_channels=1, out_channels=objective.model_out_channels(1), sample_size=4)
        self.transformer.forward = self.forward

    def forward(self, hidden_states, timestep, class_labels, **kwargs):
        self.calls.append((hidden_states.clone(), timestep.clone()))
        return Transformer2DModelOutput(sample=self.output(hidden_states, timestep))

    def output(self, x, timestep):
        ts = timestep.double().view(-1, 1, 1, 1)
        x, x0 = x.double(), self.target.double()
        if isinstance(self.objective, DDPMObjective):  # timestep = integer t; output [eps | v = -1]
            abar = self.objective.alphas_cumprod[timestep.long()].view(-1, 1, 1, 1)
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            return torch.cat([eps, -torch.ones_like(eps)], dim=1).float()
        if isinstance(self.objective, FlowObjective):  # timestep = 1000 t; output v = (x_t - x0) / t
            return ((x - x0) / (ts / 1000)).float()
        sigma = (4 * ts).exp()  # EDM: timestep = ln(sigma) / 4, input = c_in x; output F with D(x) = x0
        c_skip, c_out, c_in, _ = self.objective.preconditioning(sigma)
        return ((x0 - c_skip * x / c_in) / c_out).float()


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_samples_what_was_trained(name):
    """A model with zero training loss (the exact denoiser of a one-point data set, built from the training
    conventions) must make the pipeline produce that point, whatever the initial noise: this fails for any mismatch
    in timestep convention, input scaling or output parametrisation between training and the scheduler."""
    objective = get_objective(name)
    target = torch.rand(1, 1, 4, 4, generator=gen(5)) * 2 - 1
    perfect = PerfectModel(objective, target)
    # It is a zero-loss model for training...
    inputs = objective.training_inputs(target.expand(8, -1, -1, -1), generator=gen())
    if name == "ddpm":
        inputs = ddpm_inputs_at(objective, target.expand(8, -1, -1, -1), inputs.t.clamp(min=1), inputs.noise)
    out = perfect.output(inputs.model_input, inputs.timestep)
    assert objective.per_element_loss(out, target.expand(8, -1, -1, -1), inputs).abs().max() < 1e-4
    # ... and the pipeline, driven by the objective's scheduler, lands on the data point.
    pipe = TreadDiTPipeline(transformer=perfect.transformer, vae=None, scheduler=objective.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    samples = pipe([0, 1, 2], guidance_scale=1.0, num_inference_steps=10, output_type="latent", generator=gen()).images
    torch.testing.assert_close(samples, target.expand(3, -1, -1, -1), rtol=0, atol=2e-3)
    assert len(perfect.calls) == 10


def test_pipeline_timesteps_flow_and_edm():
    """What the pipeline hands the transformer: flow, the unscaled sample and sigma * 1000 (starting at 1000);
    EDM, c_in * sample and c_noise = ln(sigma) / 4 (starting at ln(80) / 4)."""
    target = torch.zeros(1, 1, 4, 4)
    for objective in (FlowObjective(), EDMObjective()):
        perfect = PerfectModel(objective, target)
        scheduler = objective.make_scheduler()
        pipe = TreadDiTPipeline(transformer=perfect.transformer, vae=None, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        latents = torch.randn(1, 1, 4, 4, generator=gen())
        pipe([0], guidance_scale=1.0, num_inference_steps=5, output_type="latent", latents=latents.clone())
        (first_input, first_timestep), sigmas = perfect.calls[0], scheduler.sigmas[:-1]
        timesteps = torch.cat([timestep for _, timestep in perfect.calls])
        if isinstance(objective, FlowObjective):
            torch.testing.assert_close(timesteps, sigmas * 1000)
            assert first_timestep.item() == pytest.approx(1000.0)
            torch.testing.assert_close(first_input, latents)
        else:
            c_skip, c_out, c_in, c_noise = objective.preconditioning(sigmas)
            torch.testing.assert_close(timesteps, c_noise)
            assert first_timestep.item() == pytest.approx(math.log(80) / 4)
            torch.testing.assert_close(first_input, c_in[0] * latents * scheduler.init_noise_sigma)


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_save_load_round_trip(name, tmp_path):
    objective = get_objective(name)
    transformer = tiny_tread(in_channels=1, out_channels=objective.model_out_channels(1), sample_size=4).eval()
    pipe = TreadDiTPipeline(transformer=transformer, vae=None, scheduler=objective.make_scheduler(), id2label=None)
    pipe.save_pretrained(tmp_path)
    loaded = TreadDiTPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1, 2], guidance_scale=1.0, num_inference_steps=3, output_type="latent")
    torch.testing.assert_close(loaded(generator=gen(), **kwargs).images, pipe(generator=gen(), **kwargs).images)


# --- tiny training runs -------------------------------------------------------------------------------------------

ROUTES = [{"start_layer_idx": 1, "end_layer_idx": 2, "selection_ratio": 0.5}]


def toy_data(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """1x8x8 images in [-1, 1]: class 0 bright on the left half, class 1 on the right half, plus a little noise."""
    labels = torch.arange(batch_size) % 2
    images = -torch.ones(batch_size, 1, 8, 8)
    images[labels == 0, :, :, :4] = 1.0
    images[labels == 1, :, :, 4:] = 1.0
    images = images + 0.1 * torch.randn(images.shape, generator=generator)
    return images.clamp(-1, 1), labels


def sample_distances(model, objective: Objective, seed: int) -> tuple[float, float]:
    """Mean squared distance (in [0, 1] image space) of class-conditional samples to their own class's clean image and
    to the other class's."""
    pipe = TreadDiTPipeline(transformer=model, vae=None, scheduler=objective.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 1] * 4)
    images = pipe(labels, guidance_scale=1.0, num_inference_steps=25, output_type="pt", generator=gen(seed)).images
    left = torch.zeros(1, 8, 8)
    left[:, :, :4] = 1.0
    templates = torch.stack([left, 1 - left])  # class 0, class 1
    own = ((images - templates[labels]) ** 2).mean((1, 2, 3))
    other = ((images - templates[1 - labels]) ** 2).mean((1, 2, 3))
    return own.mean().item(), other.mean().item()


@pytest.mark.parametrize("name", NAMES)
def test_tiny_training_run_learns_the_data(name):
    seed, steps = 0, 200
    objective = get_objective(name)
    model = tiny_tread(
        seed,
        in_channels=1,
        out_channels=objective.model_out_channels(1),
        num_embeds_ada_norm=2,
        sample_size=8,
        num_layers=4,
        attention_head_dim=16,
        routes=ROUTES,
    )
    untrained_own, _ = sample_distances(model, objective, seed)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = gen(seed)
    for _ in range(steps):
        x0, labels = toy_data(32, generator)
        inputs = objective.training_inputs(x0, generator=generator)
        output = model(inputs.model_input, timestep=inputs.timestep, class_labels=labels)
        assert output.route_masks is not None  # TREAD routing is on during training
        loss = objective.per_element_loss(output.sample, x0, inputs).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    own, other = sample_distances(model, objective, seed)
    # Measured (seeds 0-6, 200 steps): untrained own >= 0.31; trained own <= 0.04, other >= 0.82.
    assert own < 0.1 and own < 0.25 * untrained_own, (own, untrained_own)
    assert other > 5 * own, (own, other)  # class-conditional
