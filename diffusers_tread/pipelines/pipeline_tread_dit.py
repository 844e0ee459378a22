"""TreadDiTPipeline: class-conditional sampling for DiT and TREAD models, a drop-in for Diffusers' ``DiTPipeline``.

Same call signature and, for the same weights, VAE, scheduler and generator, the same images as ``DiTPipeline``.
It also fixes what ``DiTPipeline`` gets wrong (diffusers issue #13616): the null class is ``num_embeds_ada_norm``
rather than a hard-coded 1000, ``out_channels=None`` works, ``id2label`` survives ``save_pretrained``, label names
may be passed directly, a learned variance reaches schedulers that use it (``variance_type="learned_range"``), the
initial noise is scaled by ``scheduler.init_noise_sigma`` (Euler-type schedulers), and ``vae=None`` samples in pixel
space. Sampling uses every token (the transformer is in eval mode, so no route is applied), except with Sparse
Guidance (``guidance="sparse"``), which forces the model's routes at two selection ratios (arXiv 2601.01608).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import numbers
from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKL, DiTTransformer2DModel, ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from .. import compat
from ..models.transformer_tread import TreadTransformer2DModel

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GUIDANCE_KINDS = ("cfg", "sparse", "cfg+sparse")
# Guidance scales beyond this only saturate the samples (black or white images, or inf/NaN in half precision); DiT
# uses 1.5 to 4 and the sparse guidance paper up to ~3, so 100 leaves a wide margin for experiments.
MAX_GUIDANCE_SCALE = 100.0


def check_sampling_arguments(
    num_inference_steps: int,
    guidance_scale: float | None,
    sparse_guidance_scale: float | None = None,
    prefix: str = "",
) -> None:
    """Refuse (`ValueError`, naming the argument, after ``prefix``, e.g. ``"--validation_"``, and its valid range) a
    step count that is not a whole number >= 1 (0 steps would return the initial noise as the samples) and a guidance
    scale that is not a finite number up to ``MAX_GUIDANCE_SCALE`` (inf or 1e30 saturate the images; NaN would
    silently turn guidance off); a scale of None (not given) passes. Used by `TreadDiTPipeline.check_inputs` and by
    the scripts, which check their options before any work."""
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"{prefix}num_inference_steps must be a whole number >= 1, got {steps!r}.")
    for name, scale in (("guidance_scale", guidance_scale), ("sparse_guidance_scale", sparse_guidance_scale)):
        if scale is None:
            continue
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(
                f"{prefix}{name} must be a finite number <= {MAX_GUIDANCE_SCALE:g} (<= 1 turns that guidance off), "
                f"got {scale!r}."
            )
        if scale > MAX_GUIDANCE_SCALE:
            raise ValueError(
                f"{prefix}{name} must be at most {MAX_GUIDANCE_SCALE:g} (<= 1 turns that guidance off; typical "
                f"values are 1.5 to 4), got {scale!r}: larger scales only saturate the images."
            )


def noise_levels(scheduler) -> torch.Tensor:
    """The noise level of the model input at each of ``scheduler.timesteps`` (call after ``set_timesteps``), as EDM's
    sigma: the noise standard deviation relative to the signal, ``x_t = a_t (x_0 + sigma_t * noise)`` (Karras et al.
    2022, Eq. 1 up to the scale a_t). This is the scale in which ``guidance_interval`` is given; it is the same
    number for every scheduler type, so one interval carries over between samplers and step counts:

    - variance preserving (DDIM, DDPM, PNDM: ``alphas_cumprod``): ``sigma = sqrt((1 - abar_t) / abar_t)``;
    - Euler / DPM-Solver / EDM schedulers: their ``sigmas``, which are already EDM's sigma;
    - flow matching (``x_t = (1 - s) x_0 + s noise``): ``sigma = s / (1 - s)`` (``inf`` at pure noise, s = 1).
    """
    timesteps = scheduler.timesteps
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) >= len(timesteps):
        sigmas = torch.as_tensor(sigmas[: len(timesteps)]).detach().cpu().to(torch.float64)
        uses_flow_sigmas = "FlowMatch" in type(scheduler).__name__ or scheduler.config.get("use_flow_sigmas", False)
        return sigmas / (1.0 - sigmas) if uses_flow_sigmas else sigmas
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"Cannot tell the noise level of {type(scheduler).__name__}'s steps (it has neither `sigmas` nor "
            "`alphas_cumprod`), so guidance_interval cannot be used with it."
        )
    alphas_cumprod = alphas_cumprod.detach().cpu().to(torch.float64)[timesteps.detach().cpu().long()]
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def model_timesteps(timestep: torch.Tensor | float | int, model_input: torch.Tensor) -> torch.Tensor:
    """A scheduler's timestep as the model takes it, as `DiTPipeline` casts it: one value per sample of
    ``model_input``, on its device; a Python number becomes int64 / float64 (int32 / float32 on MPS and NPU)."""
    if not torch.is_tensor(timestep):
        is_mps_or_npu = model_input.device.type in ("mps", "npu")
        if isinstance(timestep, float):
            dtype = torch.float32 if is_mps_or_npu else torch.float64
        else:
            dtype = torch.int32 if is_mps_or_npu else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=model_input.device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(model_input.device)
    return timestep.expand(model_input.shape[0])


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
        transformer ([`TreadTransformer2DModel`], [`DiTTransformer2DModel`] or [`TreadSSM2DModel`]): the denoiser;
            any model with DiT's forward (``hidden_states, timestep, class_labels``) and config fields.
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
        transformer: DiTTransformer2DModel | ModelMixin,
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
        a ``TreadTransformer2DModel`` without routes, sharing its weights, ready for TREAD fine-tuning. Weights load
        as Diffusers' default: safetensors when present, else a pickled ``.bin`` through
        ``torch.load(weights_only=True)`` (tensors only; a pickle that would build other objects is refused)."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        # A config check, not a class check: the Hub bundle's transformer class is not the one this module imports.
        if isinstance(pipe.transformer, DiTTransformer2DModel) and "routes" not in pipe.transformer.config:
            pipe.transformer = TreadTransformer2DModel.from_dit(pipe.transformer)
        return pipe

    if not compat.RESOLVES_PIPELINE_ANNOTATIONS:  # Diffusers 0.35-0.36 (see compat.py)
        _get_signature_types = classmethod(compat.pipeline_signature_types)

    @classmethod
    def _dict_from_json_file(cls, json_file, **kwargs):
        """Read a pushed repo's remote-code `model_index.json` (``["tread_dit", X]`` entries, for users without this
        package) as the library's own (``["diffusers_tread", X]``), so the installed package needs no
        ``trust_remote_code``. The generated Hub copy of this class (not in `diffusers_tread`) reads it unchanged.
        ``kwargs``: what the release's ``load_config`` passes (``dduf_entries=`` on 0.33-0.40, see compat.py)."""
        config = super()._dict_from_json_file(json_file, **kwargs)
        if not cls.__module__.startswith("diffusers_tread."):
            return config
        if list(config.get("_class_name") or []) == ["tread_dit", "TreadDiTPipeline"]:
            config["_class_name"] = "TreadDiTPipeline"
        for key, value in config.items():
            if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] == "tread_dit":
                config[key] = ["diffusers_tread", value[1]]
        return config

    # LoRA adapters (Diffusers' LoRA format), delegated to the transformer's PeftAdapterMixin.
    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs
    ) -> None:
        """Load a LoRA saved by `save_lora_weights` / `train_tread.py --lora_rank` (a folder, Hub id or state dict).
        Diffusers' pipeline rule for the file: safetensors preferred, else a pickled ``.bin`` loaded with
        ``torch.load(weights_only=True)``; ``use_safetensors=True`` / ``False`` asks for one of the two only."""
        if not isinstance(pretrained_model_name_or_path_or_dict, dict) and kwargs.get("use_safetensors") is None:
            # The model's load_lora_adapter alone would read only a .bin here; the pipeline-level lora_state_dict of
            # Diffusers' pipelines (e.g. SD3LoraLoaderMixin) tries safetensors first, as done here.
            kwargs.pop("use_safetensors", None)
            hub_keys = ("cache_dir", "proxies", "local_files_only", "token", "revision", "subfolder", "weight_name")
            hub_kwargs = {key: kwargs.pop(key, None) for key in hub_keys}
            hub_kwargs["force_download"] = kwargs.pop("force_download", False)
            pretrained_model_name_or_path_or_dict, metadata = compat.fetch_lora_state_dict(
                pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
                use_safetensors=True,
                allow_pickle=True,
                user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                **hub_kwargs,
            )
            kwargs["metadata"] = kwargs.get("metadata") or metadata  # the adapter's LoraConfig (safetensors header)
        self.transformer.load_lora_adapter(
            pretrained_model_name_or_path_or_dict, prefix=None, adapter_name=adapter_name, **kwargs
        )

    def save_lora_weights(self, save_directory: str, adapter_name: str = "default") -> None:
        self.transformer.save_lora_adapter(save_directory, adapter_name=adapter_name)

    def set_adapters(self, adapter_names: list[str] | str, adapter_weights: float | list[float] | None = None):
        """Activate adapters with scales, e.g. ``pipe.set_adapters("default", 0.5)``."""
        self.transformer.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        self.transformer.fuse_lora(lora_scale=lora_scale, adapter_names=adapter_names)

    def unfuse_lora(self) -> None:
        self.transformer.unfuse_lora()

    def unload_lora_weights(self) -> None:
        self.transformer.unload_lora()

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

    def check_inputs(
        self, num_inference_steps: int, guidance_scale: float, sparse_guidance_scale: float | None = None
    ) -> None:
        """Validate `__call__`'s step count and guidance scales (see `check_sampling_arguments`), before any work;
        the guidance kind, ratios and interval are checked by `check_guidance_inputs`."""
        check_sampling_arguments(num_inference_steps, guidance_scale, sparse_guidance_scale)

    def check_guidance_inputs(
        self,
        guidance: str,
        guidance_scale: float,
        sparse_ratios: tuple[float, float],
        sparse_guidance_scale: float | None,
        guidance_interval: tuple[float, float] | None,
    ) -> tuple[float, float]:
        """Validate the guidance arguments of `__call__`; return ``(cfg_scale, sparse_scale)``, 1 for a kind not used."""
        if guidance not in GUIDANCE_KINDS:
            raise ValueError(f"guidance must be one of {GUIDANCE_KINDS}, got {guidance!r}.")
        if guidance_interval is not None:
            if len(guidance_interval) != 2 or not 0 <= guidance_interval[0] < guidance_interval[1]:
                raise ValueError(
                    "guidance_interval must be (sigma_low, sigma_high) with 0 <= sigma_low < sigma_high "
                    f"(noise levels, see `noise_levels`), got {guidance_interval!r}."
                )
        if guidance == "cfg":
            if sparse_guidance_scale is not None:
                raise ValueError("sparse_guidance_scale is only used with guidance='sparse' or 'cfg+sparse'.")
            return self._scales(guidance, guidance_scale, sparse_guidance_scale)
        if guidance == "cfg+sparse" and sparse_guidance_scale is None:
            raise ValueError(
                "guidance='cfg+sparse' needs two scales: guidance_scale (classifier-free) and sparse_guidance_scale."
            )

        if len(sparse_ratios) != 2 or not 0 <= sparse_ratios[0] <= sparse_ratios[1] < 1:
            raise ValueError(
                "sparse_ratios must be (gamma_strong, gamma_weak) with 0 <= gamma_strong <= gamma_weak < 1: the "
                f"fractions of tokens that bypass the model's routes in the two passes; got {sparse_ratios!r}."
            )
        routes = self.transformer.config.get("routes") or []  # TREAD backbones (DiT or SSM); a stock DiT has none
        if not routes:
            raise ValueError(
                "Sparse guidance runs the model's routes at the sparse_ratios, but this transformer has no routes. "
                "Give it the routes it was trained with, e.g. `pipe.transformer = TreadTransformer2DModel.from_dit("
                "pipe.transformer, routes=paper_routes(pipe.transformer.config.num_layers))`, or use guidance='cfg'."
            )
        return self._scales(guidance, guidance_scale, sparse_guidance_scale)

    @staticmethod
    def _scales(guidance: str, guidance_scale: float, sparse_guidance_scale: float | None) -> tuple[float, float]:
        """``(cfg_scale, sparse_scale)`` of a guidance kind, 1 for a kind not used (see `__call__`'s ``guidance``)."""
        if guidance == "cfg":
            return guidance_scale, 1.0
        sparse_scale = guidance_scale if sparse_guidance_scale is None else sparse_guidance_scale
        return (guidance_scale if guidance == "cfg+sparse" else 1.0), sparse_scale

    # Diffusers' callback convention (`callback_on_step_end`): a callback reads these and may set `_guidance_scale`
    # (or `_sparse_guidance_scale`) for the following steps, or `_interrupt = True` to skip the remaining steps.
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def sparse_guidance_scale(self) -> float | None:
        return self._sparse_guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current scales include classifier-free guidance (``guidance_interval`` aside)."""
        return self._scales(self._guidance, self._guidance_scale, self._sparse_guidance_scale)[0] > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def routed_prediction(
        self,
        model_input: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        selection_ratio: float,
        routing_seed: int,
    ) -> torch.Tensor:
        """``D(x, c; gamma)`` of Sparse Guidance: one forward with the model's routes forced at ``selection_ratio``.

        The routed subsets are drawn by a generator seeded with ``routing_seed``. The pipeline gives every pass of a
        step the same seed, so the passes share one random token order per sample: a pass at a lower ratio keeps a
        superset of the tokens a pass at a higher ratio keeps, and the guidance difference reflects the sparsity, not
        two unrelated subsets.
        """
        return self.transformer(
            model_input,
            timestep=timesteps,
            class_labels=class_labels,
            force_routing=True,
            selection_ratio=selection_ratio,
            route_generator=torch.Generator().manual_seed(routing_seed),
        ).sample

    def guided_prediction(
        self,
        latents: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor,
        class_null: torch.Tensor,
        guidance: str,
        cfg_scale: float,
        sparse_scale: float,
        sparse_ratios: tuple[float, float] = (0.3, 0.7),
        routing_seed: int = 0,
    ) -> torch.Tensor:
        """One step's guided model output (see `__call__`'s ``guidance``) for ``latents`` at timestep ``t``: the
        predicted noise, guided on the latent channels, and a learned variance (channels ``in_channels:``, if any)
        from the conditional (for the sparse kinds, the strong) pass. A scale <= 1 turns its guidance off.
        ``routing_seed`` seeds the routed passes of the sparse kinds (one seed for all the step's passes)."""
        latent_channels = self.transformer.config.in_channels
        sparse = guidance != "cfg"
        step_cfg = cfg_scale > 1
        # Sparse kinds run separate passes (different ratios cannot share a batch); "cfg" batches its two.
        model_input = torch.cat([latents, latents]) if step_cfg and not sparse else latents
        if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
            model_input = self.scheduler.scale_model_input(model_input, t)
        timesteps = model_timesteps(t, model_input)

        if not sparse:
            labels = torch.cat([class_labels, class_null]) if step_cfg else class_labels
            noise_pred = self.transformer(model_input, timestep=timesteps, class_labels=labels).sample
            # Guidance on the predicted noise (all latent channels, as DiTPipeline); a learned variance
            # (learned-sigma models, channels latent_channels:) is taken from the conditional pass.
            if step_cfg:
                cond, uncond = noise_pred.chunk(2)
                guided = uncond[:, :latent_channels] + cfg_scale * (
                    cond[:, :latent_channels] - uncond[:, :latent_channels]
                )
                noise_pred = torch.cat([guided, cond[:, latent_channels:]], dim=1)
            return noise_pred
        gamma_strong, gamma_weak = sparse_ratios
        strong = self.routed_prediction(model_input, timesteps, class_labels, gamma_strong, routing_seed)
        guided = strong[:, :latent_channels]
        if sparse_scale > 1:
            # Sparse Guidance (arXiv 2601.01608), both passes conditional:
            # D(c; g_w) + s (D(c; g_s) - D(c; g_w)) = D(c; g_s) + (s - 1) (D(c; g_s) - D(c; g_w))
            weak = self.routed_prediction(model_input, timesteps, class_labels, gamma_weak, routing_seed)
            guided = guided + (sparse_scale - 1) * (strong[:, :latent_channels] - weak[:, :latent_channels])
        if step_cfg:
            # CFG at the strong ratio, same token subsets: + (w - 1) (D(c; g_s) - D(null; g_s))
            uncond = self.routed_prediction(model_input, timesteps, class_null, gamma_strong, routing_seed)
            guided = guided + (cfg_scale - 1) * (strong[:, :latent_channels] - uncond[:, :latent_channels])
        return torch.cat([guided, strong[:, latent_channels:]], dim=1)

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
        guidance: str = "cfg",
        sparse_ratios: tuple[float, float] = (0.3, 0.7),
        sparse_guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images of the given classes.

        Args:
            class_labels: class ids, class names (see `pipe.labels`), or both mixed; nested lists and tensors work.
            guidance_scale: classifier-free guidance scale (conditional vs the null class); off when <= 1, at most
                ``MAX_GUIDANCE_SCALE`` (100). With
                ``guidance="sparse"`` and no ``sparse_guidance_scale``, the Sparse Guidance scale instead.
            generator: makes the initial noise (and stochastic scheduler steps) reproducible.
            num_inference_steps: number of denoising steps, a whole number >= 1.
            output_type: ``"pil"``, ``"np"`` (NHWC float in [0, 1]), ``"pt"`` (NCHW float in [0, 1]) or ``"latent"``.
            return_dict: return an [`ImagePipelineOutput`] rather than a tuple.
            eta: DDIM's eta (ignored by other schedulers).
            latents: initial noise of shape ``(batch, in_channels, sample_size, sample_size)`` instead of drawing it.
            callback_on_step_end: called as ``fn(pipe, step, timestep, callback_kwargs)`` after each step; may return
                replaced ``latents``. As in Diffusers, it may read ``pipe.guidance_scale``, ``pipe.num_timesteps``,
                ``pipe.do_classifier_free_guidance``, set ``pipe._guidance_scale`` (or ``pipe._sparse_guidance_scale``)
                for the following steps, or set ``pipe._interrupt = True`` to skip the remaining steps.
            callback_on_step_end_tensor_inputs: the tensors passed in ``callback_kwargs``.
            guidance: which guidance to apply; writing ``D(c; g)`` for the conditional prediction with the model's
                routes forced at selection ratio ``g``, ``D(c)`` for the dense one and ``null`` for the null class:

                - ``"cfg"``: classifier-free guidance, ``D(c) + (w - 1) (D(c) - D(null))``, ``w = guidance_scale``,
                  every token in every block (as `DiTPipeline`).
                - ``"sparse"``: Sparse Guidance (Krause et al., arXiv 2601.01608), two *conditional* passes
                  ``D(c; g_weak) + s (D(c; g_strong) - D(c; g_weak))``, ``s = sparse_guidance_scale`` (or
                  ``guidance_scale`` when that is None). The label is never dropped.
                - ``"cfg+sparse"``: both, as a sum of guidance directions from the strong pass:
                  ``D(c; g_strong) + (w - 1) (D(c; g_strong) - D(null; g_strong)) + (s - 1) (D(c; g_strong) -
                  D(c; g_weak))``; it reduces to ``"sparse"`` for ``w = 1`` and to CFG at ratio ``g_strong`` for
                  ``s = 1``.

                A scale <= 1 turns its guidance off, leaving ``D(c)`` (``"cfg"``) or ``D(c; g_strong)`` (the sparse
                kinds). Transformer passes per step: 1 unguided, 2 dense for ``"cfg"``, 2 routed for ``"sparse"``,
                3 routed for ``"cfg+sparse"``.
            sparse_ratios: ``(g_strong, g_weak)``, ``0 <= g_strong <= g_weak < 1``: the fraction of tokens that
                bypass each of the model's configured routes in the strong and weak pass (the routes' own ratios are
                replaced). A model without routes cannot use sparse guidance. The routed subsets are drawn from a
                seed taken from ``generator`` (its first one for a list; the global RNG for None) after the initial
                noise, so results are reproducible; they are drawn for the whole batch.
            sparse_guidance_scale: the Sparse Guidance scale ``s`` (see ``guidance``).
            guidance_interval: ``(sigma_low, sigma_high)``: guide only at steps whose noise level ``sigma`` satisfies
                ``sigma_low < sigma <= sigma_high`` (Kynkaanniemi et al. 2024, "Applying guidance in a limited
                interval"); elsewhere the scales are 1 and only the unguided pass runs. ``sigma`` is EDM's noise
                level, the noise std relative to the signal, computed from the scheduler for every scheduler type
                (see `noise_levels`); ``float("inf")`` is a valid ``sigma_high``. None guides at every step.

        Returns:
            [`ImagePipelineOutput`] with ``images``, or a tuple ``(images,)``.
        """
        self.check_inputs(num_inference_steps, guidance_scale, sparse_guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown_inputs = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown_inputs:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only contain {self._callback_tensor_inputs}.")
        self.check_guidance_inputs(guidance, guidance_scale, sparse_ratios, sparse_guidance_scale, guidance_interval)
        self._guidance = guidance
        self._guidance_scale = guidance_scale
        self._sparse_guidance_scale = sparse_guidance_scale
        self._interrupt = False

        device = self._execution_device
        class_ids = self._class_ids(class_labels)
        batch_size = len(class_ids)
        latent_size = self.transformer.config.sample_size
        latent_channels = self.transformer.config.in_channels
        sparse = guidance != "cfg"

        shape = (batch_size, latent_channels, latent_size, latent_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        # Euler/EDM-type schedulers start from noise of std init_noise_sigma; flow matching has no such attribute.
        latents = latents.to(device=device, dtype=self.transformer.dtype) * getattr(
            self.scheduler, "init_noise_sigma", 1.0
        )
        if sparse:
            # One draw, after the initial noise: step i's routed passes use seed routing_seed + i.
            source = generator[0] if isinstance(generator, list) else generator
            source_device = source.device if source is not None else "cpu"
            routing_seed = int(torch.randint(0, 2**62, (1,), generator=source, device=source_device).item())

        class_labels = torch.tensor(class_ids, device=device)
        class_null = torch.full((batch_size,), self.num_classes, device=device)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        learned_variance = self.scheduler.config.get("variance_type") in ("learned", "learned_range")
        if guidance_interval is None:
            guided_steps = [True] * len(self.scheduler.timesteps)
        else:
            sigma_low, sigma_high = guidance_interval
            guided_steps = [sigma_low < sigma <= sigma_high for sigma in noise_levels(self.scheduler).tolist()]

        with sampling_mode(self.transformer):
            for step, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                if self.interrupt:
                    continue
                # Read every step: a step-end callback may change the scales (Diffusers' convention).
                cfg_scale, sparse_scale = self._scales(guidance, self._guidance_scale, self._sparse_guidance_scale)
                if not guided_steps[step]:  # outside guidance_interval: the unguided pass only
                    cfg_scale, sparse_scale = 1.0, 1.0
                routing = {"sparse_ratios": sparse_ratios, "routing_seed": routing_seed + step} if sparse else {}
                noise_pred = self.guided_prediction(
                    latents, t, class_labels, class_null, guidance, cfg_scale, sparse_scale, **routing
                )
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
