import functools
import inspect
import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, stock_twin, tiny_tread
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image

from diffusers_tread import TreadDiTPipeline, TreadTransformer2DModel
from diffusers_tread.pipelines.pipeline_tread_dit import model_timesteps

ID2LABEL = {
    i: name for i, name in enumerate(["tench, Tinca tinca", "goldfish", "golden retriever", "tabby, tabby cat"])
}
ROUTES = [{"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.5}]


def components(num_classes=1000, **overrides):
    transformer = tiny_tread(routes=ROUTES, num_embeds_ada_norm=num_classes, **overrides).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL().eval()  # Diffusers' default: a tiny VAE without downsampling
    return transformer, vae


def make_pipe(scheduler=None, num_classes=1000, vae=True, **overrides):
    transformer, autoencoder = components(num_classes, **overrides)
    pipe = TreadDiTPipeline(
        transformer=transformer,
        vae=autoencoder if vae else None,
        scheduler=scheduler or DDIMScheduler(),
        id2label=ID2LABEL,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- equals stock DiTPipeline -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler_cls, scheduler_kwargs",
    [
        (DDIMScheduler, {}),
        (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    ],
)
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_equals_stock_dit_pipeline(scheduler_cls, scheduler_kwargs, guidance_scale):
    transformer, vae = components()
    stock = DiTPipeline(
        transformer=stock_twin(transformer).eval(), vae=vae, scheduler=scheduler_cls(**scheduler_kwargs)
    )
    ours = TreadDiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler_cls(**scheduler_kwargs))
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1, 3], guidance_scale=guidance_scale, num_inference_steps=4, output_type="np")
    expected = stock(generator=gen(), **kwargs).images
    actual = ours(generator=gen(), **kwargs).images
    assert actual.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(actual, expected)


def test_equals_stock_dit_pipeline_ddpm_global_seed():
    """DDPM draws step noise; with generator=None both pipelines take it from the global RNG in the same order."""
    transformer, vae = components()
    stock = DiTPipeline(transformer=stock_twin(transformer).eval(), vae=vae, scheduler=DDPMScheduler())
    ours = TreadDiTPipeline(transformer=transformer, vae=vae, scheduler=DDPMScheduler())
    kwargs = dict(class_labels=[2], guidance_scale=1.0, num_inference_steps=5, output_type="np")
    torch.manual_seed(11)
    expected = stock(**kwargs).images
    torch.manual_seed(11)
    np.testing.assert_array_equal(ours(**kwargs).images, expected)


def test_ddpm_learned_range_receives_the_learned_variance():
    pipe = make_pipe(DDPMScheduler(variance_type="learned_range"))
    seen = []
    step = pipe.scheduler.step

    @functools.wraps(step)  # keeps the signature, so the pipeline still passes the generator
    def spy(model_output, timestep, sample, **kwargs):
        seen.append((model_output.shape[1], sample.shape[1]))
        return step(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = spy
    a = pipe([1], num_inference_steps=3, generator=gen(), output_type="np").images
    assert seen and all(shapes == (8, 4) for shapes in seen)  # [eps | variance] for a 4-channel latent
    fixed = make_pipe(DDPMScheduler(variance_type="fixed_small"))
    c = fixed([1], num_inference_steps=3, generator=gen(), output_type="np").images
    assert not np.allclose(a, c)
    # deterministic under a generator (the step noise uses it too)
    again = make_pipe(DDPMScheduler(variance_type="learned_range"))
    np.testing.assert_array_equal(again([1], num_inference_steps=3, generator=gen(), output_type="np").images, a)


def test_euler_and_ddim_solve_the_same_ode():
    """Euler needs the initial noise scaled by init_noise_sigma (DiTPipeline omits it); with enough steps both
    samplers approximate the same probability-flow ODE, so their results agree."""
    steps = dict(class_labels=[1, 2], guidance_scale=1.0, num_inference_steps=50, output_type="latent")
    ddim = make_pipe(DDIMScheduler(timestep_spacing="trailing", clip_sample=False))(generator=gen(), **steps).images
    euler = make_pipe(EulerDiscreteScheduler(timestep_spacing="trailing"))(generator=gen(), **steps).images
    # a random tiny model extrapolates far (|x| ~ 760); without init_noise_sigma (~157) Euler is off by orders
    assert (euler - ddim).abs().max() < 1e-3 * ddim.abs().max()


# --- inputs and outputs -----------------------------------------------------------------------------------------------


def test_call_signature_is_a_drop_in_for_dit_pipeline():
    stock = list(inspect.signature(DiTPipeline.__call__).parameters.values())
    ours = list(inspect.signature(TreadDiTPipeline.__call__).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(stock)]] == [(p.name, p.default) for p in stock]
    assert all(p.default is not inspect.Parameter.empty for p in ours[len(stock) :])


def test_class_labels_accept_ids_names_nested_and_tensors():
    pipe = make_pipe()
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["class_labels"].tolist()), with_kwargs=True
    )
    pipe(["golden retriever", 207, [1, "tabby"]], guidance_scale=1.0, num_inference_steps=1, output_type="latent")
    pipe(torch.tensor([[3], [0]]), guidance_scale=1.0, num_inference_steps=1, output_type="latent")
    pipe("goldfish", guidance_scale=1.0, num_inference_steps=1, output_type="latent")
    assert seen == [[2, 207, 1, 3], [3, 0], [1]]
    assert pipe.get_label_ids(["Tinca tinca", "tench"]) == [0, 0]
    assert pipe.get_label_ids("goldfish") == [1]  # a single name, not split into characters


def test_unknown_names_and_out_of_range_ids_raise():
    pipe = make_pipe(num_classes=4)
    with pytest.raises(ValueError, match=r"Unknown class name 'golden retreiver'.*'golden retriever'"):
        pipe(["golden retreiver"], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"Class id 4 is out of range: this model has 4 classes \(ids 0..3"):
        pipe([4], num_inference_steps=1)
    with pytest.raises(ValueError, match="out of range"):
        pipe([-1], num_inference_steps=1)
    with pytest.raises(ValueError, match="must be ints or class names"):
        pipe([1.5], num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe([1], num_inference_steps=1, output_type="jpg")
    no_labels = TreadDiTPipeline(transformer=pipe.transformer, vae=None, scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="has no id2label; pass integer class ids"):
        no_labels(["goldfish"], num_inference_steps=1)


def test_null_class_is_num_embeds_ada_norm_not_1000():
    pipe = make_pipe(num_classes=4)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["class_labels"].tolist()), with_kwargs=True
    )
    images = pipe([1, 2], guidance_scale=3.0, num_inference_steps=2, generator=gen(), output_type="np").images
    assert seen[0] == [1, 2, 4, 4] and np.isfinite(images).all()


def test_out_channels_none_model_works():
    pipe = make_pipe(out_channels=None)
    assert pipe.transformer.config.out_channels is None
    images = pipe([1], guidance_scale=4.0, num_inference_steps=2, generator=gen(), output_type="np").images
    assert images.shape == (1, 8, 8, 3)


@pytest.mark.parametrize(
    "output_type, check",
    [
        ("pil", lambda im: isinstance(im[0], Image.Image) and im[0].size == (8, 8)),
        ("np", lambda im: im.shape == (2, 8, 8, 3) and im.dtype == np.float32 and 0 <= im.min() <= im.max() <= 1),
        ("pt", lambda im: im.shape == (2, 3, 8, 8) and 0 <= im.min() <= im.max() <= 1),
        ("latent", lambda im: im.shape == (2, 4, 8, 8) and im.min() < -0.5),
    ],
)
def test_output_types(output_type, check):
    images = make_pipe()([1, 2], num_inference_steps=2, generator=gen(), output_type=output_type).images
    assert check(images)


def test_pixel_space_grayscale_without_vae():
    pipe = make_pipe(vae=False, in_channels=1, out_channels=None)
    images = pipe([0, 1], num_inference_steps=2, generator=gen()).images
    assert images[0].mode == "L" and images[0].size == (8, 8)


def test_tuple_output_batch_consistency_and_latents_argument():
    pipe = make_pipe()
    batch = pipe([1, 2], generator=[gen(0), gen(1)], num_inference_steps=3, output_type="np", return_dict=False)[0]
    single = pipe([1], generator=gen(0), num_inference_steps=3, output_type="np").images
    np.testing.assert_allclose(batch[:1], single, atol=1e-5)
    latents = torch.randn(1, 4, 8, 8, generator=gen(0))
    np.testing.assert_array_equal(pipe([1], latents=latents, num_inference_steps=3, output_type="np").images, single)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 8, 8\)"):
        pipe([1], latents=torch.randn(1, 4, 4, 4), num_inference_steps=1)


def test_callback_on_step_end_sees_and_can_replace_latents():
    pipe = make_pipe()
    steps = []

    def callback(p, step, t, kwargs):
        steps.append(step)
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 2 else {}

    out = pipe([1], num_inference_steps=3, generator=gen(), output_type="latent", callback_on_step_end=callback)
    assert steps == [0, 1, 2] and torch.equal(out.images, torch.zeros(1, 4, 8, 8))


def count_batches(pipe):
    """Record the batch size of every transformer forward."""
    batches = []
    pipe.transformer.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    return batches


def test_callback_convention_guidance_scale_num_timesteps_and_cfg_cutoff():
    """Diffusers' convention (its PipelineTesterMixin.test_callback_cfg / test_callback_inputs): a step-end callback
    reads ``num_timesteps`` and ``guidance_scale`` and may change ``_guidance_scale`` for the following steps."""
    pipe = make_pipe()
    kwargs = dict(class_labels=[1], num_inference_steps=3, output_type="latent")
    expected = pipe(generator=gen(), guidance_scale=2.0, **kwargs).images
    seen = []

    def record(p, step, t, callback_kwargs):
        seen.append((p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance))
        return callback_kwargs

    out = pipe(generator=gen(), guidance_scale=2.0, callback_on_step_end=record, **kwargs).images
    assert torch.equal(out, expected) and seen == [(3, 2.0, True)] * 3

    def increase(p, step, t, callback_kwargs):
        p._guidance_scale += 1.0
        return callback_kwargs

    batches = count_batches(pipe)
    stronger = pipe(generator=gen(), guidance_scale=2.0, callback_on_step_end=increase, **kwargs).images
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps and not torch.equal(stronger, expected)

    def cfg_cutoff(p, step, t, callback_kwargs):  # as Diffusers' SDCFGCutoffCallback: guidance off after step 0
        p._guidance_scale = 0.0
        return callback_kwargs

    batches.clear()
    pipe(generator=gen(), guidance_scale=2.0, callback_on_step_end=cfg_cutoff, **kwargs)
    assert batches == [2, 1, 1] and not pipe.do_classifier_free_guidance


def test_callback_can_interrupt_and_change_the_sparse_scale():
    pipe = make_pipe()
    kwargs = dict(class_labels=[1], num_inference_steps=3, output_type="latent")
    after_first = {}

    def stop(p, step, t, callback_kwargs):
        after_first.setdefault("latents", callback_kwargs["latents"].clone())
        p._interrupt = True
        return callback_kwargs

    batches = count_batches(pipe)
    out = pipe(generator=gen(), callback_on_step_end=stop, **kwargs).images
    assert pipe.interrupt and batches == [2] and torch.equal(out, after_first["latents"])

    def weaken(p, step, t, callback_kwargs):
        p._sparse_guidance_scale = 1.0  # Sparse Guidance off: one routed pass per step from now on
        return callback_kwargs

    batches.clear()
    pipe(generator=gen(), guidance="sparse", sparse_guidance_scale=2.0, callback_on_step_end=weaken, **kwargs)
    assert len(batches) == 2 + 1 + 1 and pipe.sparse_guidance_scale == 1.0


def test_sampling_uses_all_tokens_even_for_a_model_in_train_mode():
    pipe = make_pipe()
    expected = pipe([1, 2], num_inference_steps=2, generator=gen(), output_type="np").images
    pipe.transformer.train()
    masks = []
    pipe.transformer.register_forward_hook(lambda m, a, out: masks.append(out.route_masks))
    np.testing.assert_array_equal(
        pipe([1, 2], num_inference_steps=2, generator=gen(), output_type="np").images, expected
    )
    assert masks == [None, None] and pipe.transformer.training  # mode restored for the training loop


# --- save / load / Hub ------------------------------------------------------------------------------------------------


def test_save_load_round_trip_records_our_library_and_id2label(tmp_path):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "TreadDiTPipeline"
    assert index["transformer"] == ["diffusers_tread", "TreadTransformer2DModel"]
    assert index["id2label"]["2"] == "golden retriever"

    loaded = TreadDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, TreadTransformer2DModel) and loaded.transformer.config.routes == ROUTES
    assert loaded.labels == pipe.labels and loaded.get_label_ids("golden retriever") == [2]
    kwargs = dict(class_labels=["goldfish", 3], num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(loaded(generator=gen(), **kwargs).images, pipe(generator=gen(), **kwargs).images)


def test_pixel_space_pipeline_round_trip(tmp_path):
    pipe = make_pipe(vae=False, in_channels=1, out_channels=None)
    pipe.save_pretrained(tmp_path)
    loaded = TreadDiTPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None
    kwargs = dict(class_labels=[1], num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(loaded(generator=gen(), **kwargs).images, pipe(generator=gen(), **kwargs).images)


def save_stock_dit_pipeline(folder, legacy=False):
    torch.manual_seed(0)
    stock = DiTPipeline(
        transformer=DiTTransformer2DModel(**{**TINY_CONFIG, "num_embeds_ada_norm": 1000}).eval(),
        vae=AutoencoderKL().eval(),
        scheduler=DDIMScheduler(),
    )
    stock.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in ID2LABEL.items()}
    if legacy:  # the layout of facebook/DiT-XL-2-256
        index["transformer"] = ["diffusers", "Transformer2DModel"]
        config = json.loads((folder / "transformer" / "config.json").read_text())
        config["_class_name"] = "Transformer2DModel"
        (folder / "transformer" / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps(index))
    return stock


@pytest.mark.parametrize("legacy", [False, True])
def test_stock_dit_pipeline_folder_loads_as_tread(tmp_path, legacy):
    stock = save_stock_dit_pipeline(tmp_path, legacy=legacy)
    pipe = TreadDiTPipeline.from_pretrained(tmp_path)
    assert type(pipe.transformer) is TreadTransformer2DModel and pipe.transformer.config.routes == []
    assert not pipe.transformer.training and pipe.get_label_ids("tabby") == [3]
    for p in (stock, pipe):
        p.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1], num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(pipe(generator=gen(), **kwargs).images, stock(generator=gen(), **kwargs).images)
    pipe.save_pretrained(tmp_path / "converted")
    index = json.loads((tmp_path / "converted" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_tread", "TreadTransformer2DModel"]


def test_from_pretrained_from_the_hub(tmp_path, fake_hub):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "repo")
    fake_hub.add("org/tread-dit-tiny", tmp_path / "repo")
    loaded = TreadDiTPipeline.from_pretrained("org/tread-dit-tiny")
    assert ("snapshot_download", "org/tread-dit-tiny") in fake_hub.calls  # the real download path ran
    assert isinstance(loaded.transformer, TreadTransformer2DModel) and loaded.transformer.config.routes == ROUTES
    assert loaded.get_label_ids("goldfish") == [1]
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1], num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(loaded(generator=gen(), **kwargs).images, pipe(generator=gen(), **kwargs).images)


def test_hub_simulation_catches_the_unregistered_library_trap(tmp_path, fake_hub, monkeypatch):
    """Without the registration in diffusers_tread/__init__.py, Diffusers' download step rejects our library."""
    from diffusers.pipelines import pipeline_loading_utils

    make_pipe().save_pretrained(tmp_path / "repo")
    fake_hub.add("org/tread-dit-tiny", tmp_path / "repo")
    monkeypatch.delitem(pipeline_loading_utils.LOADABLE_CLASSES, "diffusers_tread")
    with pytest.raises(ValueError, match="does not exist in org/tread-dit-tiny"):
        TreadDiTPipeline.from_pretrained("org/tread-dit-tiny")


def test_stock_dit_repo_from_the_hub_loads_as_tread(tmp_path, fake_hub):
    save_stock_dit_pipeline(tmp_path / "repo", legacy=True)
    fake_hub.add("facebook/DiT-XL-2-256", tmp_path / "repo")
    pipe = TreadDiTPipeline.from_pretrained("facebook/DiT-XL-2-256")
    assert type(pipe.transformer) is TreadTransformer2DModel and pipe.transformer.config.routes == []


def test_bin_weights_load_by_default_but_a_code_running_pickle_is_refused(tmp_path):
    """Diffusers' default, as DiTPipeline (its `test_save_load_local` saves ``.bin``): safetensors preferred, a pickled
    ``.bin`` loaded with ``torch.load(weights_only=True)``, which refuses anything but tensors."""
    from peft import LoraConfig
    from unsafe_pickle import assert_refused_by_weights_only, poison

    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=False)
    weights_file = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.bin"
    assert weights_file.exists() and not weights_file.with_suffix(".safetensors").exists()
    loaded = TreadDiTPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.transformer, TreadTransformer2DModel) and loaded.transformer.config.routes == ROUTES
    for name in ("transformer", "vae"):
        saved, restored = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert restored.keys() == saved.keys() and all(torch.equal(restored[k], v) for k, v in saved.items())
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1], num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(loaded(generator=gen(), **kwargs).images, pipe(generator=gen(), **kwargs).images)

    # LoRA files as Diffusers' pipelines load them: safetensors preferred (its header keeps lora_alpha), else a .bin
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q"]))
    pipe.transformer.save_lora_adapter(tmp_path / "lora")
    pipe.transformer.save_lora_adapter(tmp_path / "lora", safe_serialization=False)
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights.bin",
    }
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen()), torch.tensor([10, 500]), torch.tensor([1, 2])
    expected = pipe.transformer(x, t, y).sample
    loaded.load_lora_weights(tmp_path / "lora")
    assert loaded.transformer.peft_config["default_0"].lora_alpha == 8
    torch.testing.assert_close(loaded.transformer(x, t, y).sample, expected, rtol=0, atol=0)
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").unlink()
    loaded.load_lora_weights(tmp_path / "lora", adapter_name="from_bin")
    lora = [v for k, v in pipe.transformer.state_dict().items() if "lora_" in k]
    restored = [v for k, v in loaded.transformer.state_dict().items() if "lora_" in k and "from_bin" in k]
    assert len(lora) == len(restored) == 12 and all(torch.equal(a, b) for a, b in zip(lora, restored, strict=True))

    marker = tmp_path / "payload_ran"
    poison(weights_file, marker)
    with pytest.raises(OSError) as excinfo:
        TreadDiTPipeline.from_pretrained(tmp_path / "pipe")
    assert_refused_by_weights_only(excinfo, weights_file, marker)


def test_model_timesteps_casts_as_dit_pipeline():
    sample = torch.zeros(3, 4, 2, 2)
    for timestep, dtype in ((7, torch.int64), (7.5, torch.float64), (torch.tensor(7), torch.int64)):
        cast = model_timesteps(timestep, sample)
        assert (
            cast.dtype == dtype and cast.tolist() == [timestep.item() if torch.is_tensor(timestep) else timestep] * 3
        )
    assert model_timesteps(torch.tensor([5.0]), sample).tolist() == [5.0] * 3
