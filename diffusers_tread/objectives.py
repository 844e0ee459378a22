"""Training objectives for class-conditional DiTs, each paired with the Diffusers scheduler that samples it.

An objective turns clean data ``x0`` into transformer inputs (`Objective.training_inputs`: its random draws,
`Objective.draw`, then the pure tensor function `Objective.inputs_from_draws`, which a compiled training step can
contain; a ``torch.Generator`` draw cannot be traced), scores the transformer's
output with an elementwise loss map (`Objective.per_element_loss`: its plain ``.mean()`` is the objective's usual
scalar loss, and a router-aware reduction can average it per patch token instead), and builds the scheduler with which
`TreadDiTPipeline` samples what was trained (`Objective.make_scheduler`):

- ``"ddpm"``: DiT's objective (Peebles & Xie 2023, Sec. 3.1): improved DDPM (Nichol & Dhariwal 2021) with 1000 linear
  betas, epsilon prediction and a learned variance, trained with the hybrid loss; sampled by ``DDPMScheduler`` with
  ``variance_type="learned_range"``.
- ``"flow"``: rectified flow / SiT's linear interpolant with velocity prediction and logit-normal times (Esser et al.
  2024, "SD3", Sec. 2 and 3.1); sampled by ``FlowMatchEulerDiscreteScheduler``.
- ``"edm"``: Karras et al. 2022 ("EDM") as used by TREAD's DiT rows: log-normal sigmas and EDM's preconditioning;
  sampled by ``EDMEulerScheduler``.

Train and sample agree by construction: every objective feeds the transformer exactly the ``timestep`` values and input
scaling that its scheduler feeds it in the pipeline, and reads the output the way that scheduler's ``step`` reads it
(``tests/test_objectives.py`` checks both against the scheduler code).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin


@dataclass
class TrainingInputs:
    """What one training step feeds the transformer, and what the loss needs besides ``x0``.

    Args:
        model_input: the transformer's ``hidden_states``.
        timestep: the transformer's ``timestep``, shape ``(B,)``, in the convention of the objective's scheduler.
        noisy_sample: the noised data ``x_t`` (for EDM ``x0 + sigma * noise``, before the ``c_in`` scaling).
        noise: the standard Gaussian noise drawn.
        t: the diffusion time: the integer step for DDPM, the interpolation time in ``(0, 1)`` for flow, shape ``(B,)``.
        sigma: the EDM noise level, shape ``(B,)``; ``None`` for the other objectives.
    """

    model_input: torch.Tensor
    timestep: torch.Tensor
    noisy_sample: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor | None = None
    sigma: torch.Tensor | None = None


@dataclass
class ObjectiveDraws:
    """The random draws of one training step's noising, made ahead of it (`Objective.draw`).

    Args:
        time: ``(B,)``, the objective's raw time draw: DDPM's integer step, flow's logit-normal ``u`` before the
            sigmoid, EDM's standard normal draw of ``ln sigma`` before scaling.
        noise: standard Gaussian noise of ``x0``'s shape and dtype.
    """

    time: torch.Tensor
    noise: torch.Tensor


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` (as many singleton dims as ``like`` has), on ``like``'s device and dtype."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (CPU generators work for GPU data), float32."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


class Objective:
    """Base class: a diffusion or flow training objective and the scheduler that samples it.

    Subclasses are dataclasses whose fields are their hyper-parameters (so `config` is just ``asdict``), and set
    ``name``, the key in `OBJECTIVES`.
    """

    name: ClassVar[str]

    def model_out_channels(self, in_channels: int) -> int:
        """The transformer's ``out_channels`` for data with ``in_channels`` channels."""
        return in_channels

    def training_inputs(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> TrainingInputs:
        """Noise a batch of clean data ``x0`` (B, C, H, W); random draws use ``generator`` (else the global RNG)."""
        return self.inputs_from_draws(x0, self.draw(x0, generator))

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveDraws:
        """The random draws `training_inputs` makes for ``x0``, in its order (the time, then the noise)."""
        raise NotImplementedError

    def inputs_from_draws(self, x0: torch.Tensor, draws: ObjectiveDraws) -> TrainingInputs:
        """`training_inputs` from draws made ahead: tensor arithmetic only (no draw, no host synchronisation)."""
        raise NotImplementedError

    def per_element_loss(self, model_output: torch.Tensor, x0: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        """Float32 loss map of ``x0``'s shape whose ``.mean()`` is the objective's usual scalar loss."""
        raise NotImplementedError

    def denoised(self, model_output: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        """The model's estimate of ``x0`` (differentiable), e.g. for auxiliary losses."""
        raise NotImplementedError

    def make_scheduler(self) -> SchedulerMixin:
        """A fresh Diffusers scheduler with which `TreadDiTPipeline` samples this objective."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serialisable name and hyper-parameters, e.g. for model cards."""
        return {"name": self.name, **asdict(self)}

    @staticmethod
    def _prediction(model_output: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        # The prediction channels (a learned-variance half, if any, is dropped as the pipeline drops it), in float32.
        return model_output[:, : x0.shape[1]].float()


# ----------------------------------------------------------------------------------------------------------------------
# DDPM (DiT / improved DDPM)
# ----------------------------------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (iDDPM / guided-diffusion)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, bin_width: float = 2.0 / 255.0
) -> torch.Tensor:
    """Elementwise log-probability (nats) of data ``x`` in [-1, 1], discretised into 256 bins of width ``bin_width``,
    under N(mean, exp(log_scale)^2): the mass of ``x``'s bin, the outermost bins extended to -inf / +inf.

    DDPM's decoder L_0 (Ho et al. 2020, Eq. 13), as implemented in guided-diffusion's ``losses.py``, but with the exact
    normal CDF (``log_ndtr``) rather than guided-diffusion's tanh approximation.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + bin_width / 2)
    lower = inv_std * (centered - bin_width / 2)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < upper edge): the lowest bin
    log_survival_lower = torch.special.log_ndtr(-lower)  # log P(X > lower edge): the highest bin
    log_bin_mass = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin_mass))


@dataclass
class DDPMObjective(Objective):
    """DiT's objective: DDPM with epsilon prediction and a learned variance, trained with iDDPM's hybrid loss.

    The transformer outputs ``[eps | v]`` (twice the data channels). ``v`` sets the reverse-process log-variance by
    interpolating between ``log beta_t`` and ``log beta-tilde_t`` ("learned_range", iDDPM Eq. 15), exactly as
    ``DDPMScheduler(variance_type="learned_range")`` reads it at sampling. The loss is DiT's (guided-diffusion
    ``training_losses`` with ``loss_type=MSE`` and ``learn_sigma=True``): ``mse(eps) + L_vlb``, where ``L_vlb`` (bits
    per dimension) is ``KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))`` for t > 0 and the discretised Gaussian decoder NLL
    at t = 0, computed with the predicted mean detached so that it only trains the variance (iDDPM Sec. 3.1). iDDPM's
    lambda = 0.001 weights L_vlb = sum_t L_t, which one uniform t estimates as 1000 L_t; so the per-sample loss is
    ``mse + L_t`` (guided-diffusion ``training_losses``, which DiT trains with unchanged).

    The decoder NLL assumes data in [-1, 1] with 8-bit bins (iDDPM Sec. 2 / DDPM Eq. 13). DiT applies it unchanged to
    VAE latents, where it is only a rough treatment of the t = 0 term (1 of the 1000 timesteps).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    name: ClassVar[str] = "ddpm"

    def __post_init__(self):
        # Schedule in float64 as guided-diffusion (gaussian_diffusion.py), cast at use.
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, beta-tilde_t)   (DDPM Eq. 6-7)
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta-tilde_0 = 0: its log is clipped to beta-tilde_1, as in guided-diffusion (`posterior_log_variance_clipped`).
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_coef_x0 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_coef_xt = (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # The table moves to t's device (not t to the table's): reading t back to the host would synchronise.
        return _expand(table.to(t.device)[t], like)

    def model_out_channels(self, in_channels: int) -> int:
        return 2 * in_channels  # [eps | v]

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveDraws:
        device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator, device=device)
        return ObjectiveDraws(time=t.to(x0.device), noise=_randn(tuple(x0.shape), x0, generator).to(x0.dtype))

    def inputs_from_draws(self, x0: torch.Tensor, draws: ObjectiveDraws) -> TrainingInputs:
        t, noise = draws.time, draws.noise
        # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)   (DDPM Eq. 4)
        abar = self._at(self.alphas_cumprod, t, x0)
        x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
        return TrainingInputs(model_input=x_t, timestep=t, noisy_sample=x_t, noise=noise, t=t)

    def _x0_from_eps(self, eps: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        abar = self._at(self.alphas_cumprod, inputs.t, eps)
        return (inputs.noisy_sample.to(eps.dtype) - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log Sigma_theta = frac log beta_t + (1 - frac) log beta-tilde_t, frac = (v + 1) / 2   (iDDPM Eq. 15)."""
        frac = (v + 1.0) / 2.0
        return frac * self._at(self.betas.log(), t, v) + (1.0 - frac) * self._at(self.posterior_log_variance, t, v)

    def per_element_loss(self, model_output: torch.Tensor, x0: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        channels = x0.shape[1]
        eps_pred, v = model_output[:, :channels].float(), model_output[:, channels : 2 * channels].float()
        x0, x_t, t = x0.float(), inputs.noisy_sample.float(), inputs.t
        mse = (inputs.noise.float() - eps_pred) ** 2

        # L_vlb with a stop-gradient on the mean (iDDPM Sec. 3.1): it trains only the variance.
        x0_pred = self._x0_from_eps(eps_pred.detach(), inputs)
        coef_x0, coef_xt = self._at(self.posterior_coef_x0, t, x0), self._at(self.posterior_coef_xt, t, x0)
        model_mean = coef_x0 * x0_pred + coef_xt * x_t
        model_log_var = self.model_log_variance(v, t)
        true_mean = coef_x0 * x0 + coef_xt * x_t
        kl = normal_kl(true_mean, self._at(self.posterior_log_variance, t, x0), model_mean, model_log_var)
        decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        vb = torch.where((t == 0).reshape(-1, *([1] * (x0.ndim - 1))), decoder_nll, kl) / math.log(2.0)  # nats -> bits
        return mse + vb

    def denoised(self, model_output: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        return self._x0_from_eps(model_output[:, : inputs.noise.shape[1]].float(), inputs)

    def make_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule="linear",
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            variance_type="learned_range",
            clip_sample=False,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Rectified flow (SiT linear interpolant)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class FlowObjective(Objective):
    """Rectified flow: ``x_t = (1 - t) x0 + t noise``, velocity target ``noise - x0`` (SD3 Eq. 2-3 / SiT's linear
    interpolant), ``t = sigmoid(u)``, ``u ~ N(logit_mean, logit_std^2)`` ("logit-normal sampling", SD3 Sec. 3.1).

    The transformer sees ``timestep = t * num_train_timesteps``: ``FlowMatchEulerDiscreteScheduler`` hands the model
    ``sigma * num_train_timesteps`` with ``sigma`` = our ``t``, and its Euler step ``x + (sigma_next - sigma) * v``
    integrates the predicted velocity ``dx_t/dt``.
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000
    name: ClassVar[str] = "flow"

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveDraws:
        u = _randn((x0.shape[0],), x0, generator) * self.logit_std + self.logit_mean
        return ObjectiveDraws(time=u, noise=_randn(tuple(x0.shape), x0, generator).to(x0.dtype))

    def inputs_from_draws(self, x0: torch.Tensor, draws: ObjectiveDraws) -> TrainingInputs:
        t, noise = torch.sigmoid(draws.time), draws.noise
        x_t = (1.0 - _expand(t, x0)) * x0 + _expand(t, x0) * noise
        return TrainingInputs(
            model_input=x_t, timestep=t * self.num_train_timesteps, noisy_sample=x_t, noise=noise, t=t
        )

    def per_element_loss(self, model_output: torch.Tensor, x0: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        velocity = inputs.noise.float() - x0.float()
        return (self._prediction(model_output, x0) - velocity) ** 2

    def denoised(self, model_output: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        velocity = self._prediction(model_output, inputs.noise)
        return inputs.noisy_sample.float() - _expand(inputs.t, velocity) * velocity

    def make_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022), as in TREAD's DiT experiments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EDMObjective(Objective):
    """EDM: ``ln sigma ~ N(P_mean, P_std^2)``, denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with
    EDM's preconditioning and loss weight ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``
    (Karras et al. 2022, Table 1 and Eq. 2, 7-8); TREAD's (and MaskDiT's) DiT setup.

    The transformer's output is EDM's raw network output F, which is what ``EDMEulerScheduler`` with
    ``prediction_type="epsilon"`` expects (despite the name, its ``precondition_outputs`` computes
    ``c_skip x + c_out F`` with EDM's c_out). The model timestep is EDM's ``c_noise = ln(sigma) / 4``, the
    scheduler's ``precondition_noise``: the scheduler passes its ``timesteps`` (= c_noise) to the transformer
    unchanged, so training must use the same values. They lie in [-1.55, 1.10] for sigma in [0.002, 80], far below
    the [0, 1000] range DiT's sinusoidal embedder was designed for (only ~23 of its 128 frequencies turn by more than
    half a radian over it). EDM's own ADM network, MaskDiT and TREAD (``c_noise = sigma.log() / 4`` into DiT's
    ``TimestepEmbedder``) nevertheless train well this way, so we keep the reference convention and the stock
    scheduler; a rescaled c_noise would need a custom scheduler class registered with the pipeline loader.

    Sampling uses the Euler sampler over Karras' sigma schedule (TREAD samples with EDM's 2nd-order Heun).
    """

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    name: ClassVar[str] = "edm"

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """EDM Table 1: ``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma``."""
        sigma_data = self.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1.0 / (sigma**2 + sigma_data**2).sqrt()
        c_noise = sigma.log() / 4.0
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2   (EDM Table 1)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveDraws:
        normal = _randn((x0.shape[0],), x0, generator)
        return ObjectiveDraws(time=normal, noise=_randn(tuple(x0.shape), x0, generator).to(x0.dtype))

    def inputs_from_draws(self, x0: torch.Tensor, draws: ObjectiveDraws) -> TrainingInputs:
        sigma, noise = (draws.time * self.p_std + self.p_mean).exp(), draws.noise
        noisy = x0 + _expand(sigma, x0) * noise
        _, _, c_in, c_noise = self.preconditioning(sigma)
        return TrainingInputs(
            model_input=_expand(c_in, x0) * noisy, timestep=c_noise, noisy_sample=noisy, noise=noise, sigma=sigma
        )

    def denoised(self, model_output: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        raw = self._prediction(model_output, inputs.noise)
        c_skip, c_out, _, _ = self.preconditioning(inputs.sigma)
        return _expand(c_skip, raw) * inputs.noisy_sample.float() + _expand(c_out, raw) * raw

    def per_element_loss(self, model_output: torch.Tensor, x0: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        weight = _expand(self.loss_weight(inputs.sigma), x0.float())
        return weight * (self.denoised(model_output, inputs) - x0.float()) ** 2

    def make_scheduler(self) -> EDMEulerScheduler:
        return EDMEulerScheduler(
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            sigma_data=self.sigma_data,
            sigma_schedule="karras",
            prediction_type="epsilon",  # D = c_skip x + c_out F: EDM's F (see the class docstring)
            rho=self.rho,
        )


OBJECTIVES: dict[str, type[Objective]] = {"ddpm": DDPMObjective, "flow": FlowObjective, "edm": EDMObjective}


def get_objective(name: str, **kwargs) -> Objective:
    """The objective called ``name`` (a key of `OBJECTIVES`), with hyper-parameter overrides ``kwargs``."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name](**kwargs)
