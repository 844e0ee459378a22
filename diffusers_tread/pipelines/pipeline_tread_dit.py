"""TreadDiTPipeline: class-conditional sampling for DiT and TREAD models, a drop-in for Diffusers' ``DiTPipeline``.

Same call signature and, for the same weights, VAE, scheduler and generator, the same images as ``DiTPipeline``.
It also fixes what ``DiTPipeline`` gets wrong (diffusers issue #13616): the null class is ``num_embeds_ada_norm``
rather than a hard-coded 1000, ``out_channels=None`` works, ``id2label`` survives ``save_pretrained``, label names
may be passed directly, a learned variance reaches schedulers that use it (``variance_type="learned_range"``), the
initial noise is scaled by ``scheduler.init_noise_sigma`` (Euler-type schedulers), and ``vae=None`` samples in pixel
space. Sampling always uses every token: the transformer is in eval mode, so no route is applied.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKL, DiTTransformer2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from ..models.transformer_tread import TreadTransformer2DModel

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@contextlib.contextmanager
def sampling_mode(model: torch.nn.Module):
    """Sample with every token: routing (and dropout) run only in train mode, so use eval mode for the call and
    restore the caller's mode after, e.g. when a training script samples from the model it is training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class TreadDiTPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with a (TREAD-trained) DiT.

    Args:
        transformer ([`TreadTransformer2DModel`] or [`DiTTransformer2DModel`]): the denoiser.
        vae ([`AutoencoderKL`], *optional*): decodes latents to images; ``None`` for a pixel-space model.
        scheduler ([`SchedulerMixin`]): e.g. DDIM, DDPM (``variance_type="learned_range"`` for learned-sigma models),
            DPM-Solver++ or Euler.
        id2label (`dict[int, str]`, *optional*): class names, comma-separated synonyms allowed (ImageNet style).
            Saved in ``model_index.json``.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        vae: AutoencoderKL | None,
        scheduler: KarrasDiffusionSchedulers,
        id2label: dict[int, str] | dict[str, str] | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        id2label = {int(key): value for key, value in id2label.items()} if id2label else None
        self.register_to_config(id2label=id2label)
        # name -> id, every comma-separated synonym included, as DiTPipeline.labels
        self.labels = {}
        for class_id, names in (id2label or {}).items():
            for name in names.split(","):
                self.labels[name.strip()] = class_id
        self.labels = dict(sorted(self.labels.items()))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> TreadDiTPipeline:
        """``DiffusionPipeline.from_pretrained``; a stock DiT transformer (e.g. ``facebook/DiT-XL-2-256``) comes back as
        a ``TreadTransformer2DModel`` without routes, sharing its weights, ready for TREAD fine-tuning."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if isinstance(pipe.transformer, DiTTransformer2DModel) and not isinstance(
            pipe.transformer, TreadTransformer2DModel
        ):
            pipe.transformer = TreadTransformer2DModel.from_dit(pipe.transformer)
        return pipe

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (a name or a list of names) to class ids; unknown names raise with the closest valid ones."""
        names = [label] if isinstance(label, str) else list(label)
        ids = []
        for name in names:
            if name not in self.labels:
                if not self.labels:
                    raise ValueError(
                        f"Class name {name!r} given, but this pipeline has no id2label; pass integer class ids "
                        f"(0..{self.num_classes - 1}) or build the pipeline with id2label=..."
                    )
                close = difflib.get_close_matches(name, list(self.labels), n=5, cutoff=0.5)
                hint = f" Closest valid names: {close}." if close else " See `pipe.labels` for the valid names."
                raise ValueError(f"Unknown class name {name!r}.{hint}")
            ids.append(self.labels[name])
        return ids

    def _class_ids(self, class_labels) -> list[int]:
        """Flatten ints, names, nested lists and tensors into a list of validated class ids."""
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.tolist()
        if isinstance(class_labels, (str, int)) or not isinstance(class_labels, (list, tuple)):
            class_labels = [class_labels]
        ids = []
        for label in class_labels:
            if isinstance(label, (list, tuple, torch.Tensor)):
                ids.extend(self._class_ids(label))
            elif isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif isinstance(label, bool) or not hasattr(label, "__index__"):
                raise ValueError(f"Class labels must be ints or class names, got {label!r} ({type(label).__name__}).")
            else:
                class_id = label.__index__()
                if not 0 <= class_id < self.num_classes:
                    raise ValueError(
                        f"Class id {class_id} is out of range: this model has {self.num_classes} classes "
                        f"(ids 0..{self.num_classes - 1}; id {self.num_classes} is the unconditional null class)."
                    )
                ids.append(class_id)
        if not ids:
            raise ValueError("class_labels is empty: pass at least one class id or name.")
        return ids

    def prepare_extra_step_kwargs(self, generator, eta):
        # Not every scheduler's step takes eta (DDIM only) or a generator (stochastic samplers).
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in step_parameters:
            extra["eta"] = eta
        if "generator" in step_parameters:
            extra["generator"] = generator
        return extra

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | list[str] | int | str | torch.Tensor,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str | None = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (Diffusers' convention)
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images of the given classes.

        Args:
            class_labels: class ids, class names (see `pipe.labels`), or both mixed; nested lists and tensors work.
            guidance_scale: classifier-free guidance scale (conditional vs the null class); off when <= 1.
            generator: makes the initial noise (and stochastic scheduler steps) reproducible.
            num_inference_steps: number of denoising steps.
            output_type: ``"pil"``, ``"np"`` (NHWC float in [0, 1]), ``"pt"`` (NCHW float in [0, 1]) or ``"latent"``.
            return_dict: return an [`ImagePipelineOutput`] rather than a tuple.
            eta: DDIM's eta (ignored by other schedulers).
            latents: initial noise of shape ``(batch, in_channels, sample_size, sample_size)`` instead of drawing it.
            callback_on_step_end: called as ``fn(pipe, step, timestep, callback_kwargs)`` after each step; may return
                replaced ``latents``.
            callback_on_step_end_tensor_inputs: the tensors passed in ``callback_kwargs``.

        Returns:
            [`ImagePipelineOutput`] with ``images``, or a tuple ``(images,)``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown_inputs = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown_inputs:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only contain {self._callback_tensor_inputs}.")

        device = self._execution_device
        class_ids = self._class_ids(class_labels)
        batch_size = len(class_ids)
        latent_size = self.transformer.config.sample_size
        latent_channels = self.transformer.config.in_channels
        do_cfg = guidance_scale > 1

        shape = (batch_size, latent_channels, latent_size, latent_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        # Euler/EDM-type schedulers start from noise of std init_noise_sigma; flow matching has no such attribute.
        latents = latents.to(device=device, dtype=self.transformer.dtype) * getattr(
            self.scheduler, "init_noise_sigma", 1.0
        )

        class_labels = torch.tensor(class_ids, device=device)
        if do_cfg:
            class_null = torch.full((batch_size,), self.num_classes, device=device)
            class_labels = torch.cat([class_labels, class_null])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        learned_variance = self.scheduler.config.get("variance_type") in ("learned", "learned_range")

        with sampling_mode(self.transformer):
            for step, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                model_input = torch.cat([latents, latents]) if do_cfg else latents
                if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
                    model_input = self.scheduler.scale_model_input(model_input, t)

                timesteps = t
                if not torch.is_tensor(timesteps):
                    is_mps_or_npu = model_input.device.type in ("mps", "npu")
                    if isinstance(timesteps, float):
                        dtype = torch.float32 if is_mps_or_npu else torch.float64
                    else:
                        dtype = torch.int32 if is_mps_or_npu else torch.int64
                    timesteps = torch.tensor([timesteps], dtype=dtype, device=model_input.device)
                elif timesteps.ndim == 0:
                    timesteps = timesteps[None].to(model_input.device)
                timesteps = timesteps.expand(model_input.shape[0])

                noise_pred = self.transformer(model_input, timestep=timesteps, class_labels=class_labels).sample

                # Guidance on the predicted noise (all latent channels, as DiTPipeline); a learned variance
                # (learned-sigma models, channels latent_channels:) is taken from the conditional pass.
                if do_cfg:
                    cond, uncond = noise_pred.chunk(2)
                    guided = uncond[:, :latent_channels] + guidance_scale * (
                        cond[:, :latent_channels] - uncond[:, :latent_channels]
                    )
                    noise_pred = torch.cat([guided, cond[:, latent_channels:]], dim=1)
                if noise_pred.shape[1] == 2 * latent_channels and not learned_variance:
                    noise_pred = noise_pred[:, :latent_channels]

                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample

                if callback_on_step_end is not None:
                    tensors = {"latents": latents}
                    callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                latents = 1 / self.vae.config.scaling_factor * latents
                if getattr(self.vae.config, "shift_factor", None) is not None:
                    latents = latents + self.vae.config.shift_factor
                images = self.vae.decode(latents.to(self.vae.dtype)).sample
            else:
                images = latents  # pixel-space model: the samples are images in [-1, 1]
            images = (images / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
