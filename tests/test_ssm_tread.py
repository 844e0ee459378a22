"""TreadSSM2DModel: the selective scan, bidirectionality, TREAD routing, saving, the pipeline, the training script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCRIPT, TINY, launch, load_module, load_script
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread import (
    SSM_PRESETS,
    TreadDiTPipeline,
    TreadSSM2DModel,
    TreadTransformer2DModelOutput,
    hub,
    paper_routes,
    routing,
)
from diffusers_tread.models import ssm_tread
from diffusers_tread.models.ssm_tread import BidirectionalMambaMixer, selective_scan, selective_scan_reference

TINY_SSM = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=6,
    hidden_size=32,
    state_size=8,
    mlp_ratio=2.0,
    num_embeds_ada_norm=10,
)
ROUTE = {"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.5}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine every small op waiting for a descheduled
    thread made this file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_ssm(seed: int = 0, **overrides) -> TreadSSM2DModel:
    """A tiny model whose zero-initialised weights (adaLN-Zero, the output layer) are made random: a fresh model
    outputs zeros and its blocks are the identity, which would make most comparisons below vacuous."""
    torch.manual_seed(seed)
    model = TreadSSM2DModel(**{**TINY_SSM, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(std=0.2)
    return model


def inputs(batch_size=3, seed=0, config=TINY_SSM):
    generator = torch.Generator().manual_seed(seed)
    size, channels = config["sample_size"], config["in_channels"]
    x = torch.randn(batch_size, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch_size,), generator=generator)
    y = torch.randint(0, config["num_embeds_ada_norm"], (batch_size,), generator=generator)
    return x, t, y


# --- the selective scan -----------------------------------------------------------------------------------------------


def scan_inputs(batch=2, dim=5, state=4, length=19, max_step=1.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(batch, dim, length, generator=generator, dtype=dtype),  # u
        torch.rand(batch, dim, length, generator=generator, dtype=dtype) * max_step,  # delta > 0
        -torch.rand(dim, state, generator=generator, dtype=dtype) * 8 - 0.1,  # A < 0
        torch.randn(batch, state, length, generator=generator, dtype=dtype),  # B
        torch.randn(batch, state, length, generator=generator, dtype=dtype),  # C
        torch.randn(dim, generator=generator, dtype=dtype),  # D
    ]
    return [tensor.requires_grad_() for tensor in tensors]


@pytest.mark.parametrize("chunk_steps", [1, 4, 1000])  # one step per chunk, uneven chunks, one chunk
@pytest.mark.parametrize("max_step", [1.0, 30.0])  # ordinary and very large step sizes (decays down to e^-250)
def test_chunked_scan_matches_the_sequential_reference(monkeypatch, chunk_steps, max_step):
    monkeypatch.setattr(ssm_tread, "SCAN_MIN_CHUNK_STEPS", chunk_steps)
    monkeypatch.setattr(ssm_tread, "SCAN_CHUNK_ELEMENTS", 1)
    args = scan_inputs(max_step=max_step)
    fast, reference = selective_scan(*args), selective_scan_reference(*args)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(reference)
    for fast_grad, reference_grad in zip(
        torch.autograd.grad(fast, args, grad_out), torch.autograd.grad(reference, args, grad_out), strict=True
    ):
        torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-5, atol=1e-5)


def test_scan_backward_passes_gradcheck_in_float64(monkeypatch):
    monkeypatch.setattr(ssm_tread, "SCAN_MIN_CHUNK_STEPS", 3)  # several chunks, the last one shorter
    monkeypatch.setattr(ssm_tread, "SCAN_CHUNK_ELEMENTS", 1)
    assert torch.autograd.gradcheck(selective_scan, scan_inputs(length=7, dtype=torch.float64))


def test_scan_runs_in_float32_under_bf16_autocast():
    args = [tensor.detach() for tensor in scan_inputs()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(args[0].bfloat16(), args[1].bfloat16(), *args[2:])
    assert out.dtype == torch.bfloat16
    reference = selective_scan_reference(args[0].bfloat16().float(), args[1].bfloat16().float(), *args[2:])
    torch.testing.assert_close(out.float(), reference, atol=0.02, rtol=0.01)


def test_mixer_is_bidirectional_and_each_direction_is_causal():
    torch.manual_seed(0)
    mixer = BidirectionalMambaMixer(hidden_size=8, state_size=4, expand=2, conv_kernel=4, time_step_rank=1)
    x = torch.randn(1, 12, 8, requires_grad=True)
    out = mixer(x)
    first_from_last = torch.autograd.grad(out[0, 0].sum(), x, retain_graph=True)[0][0, -1]
    last_from_first = torch.autograd.grad(out[0, -1].sum(), x)[0][0, 0]
    assert first_from_last.abs().sum() > 0 and last_from_first.abs().sum() > 0

    inner = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)[0]
    forward_only = mixer.forward_scan(inner)
    assert not torch.autograd.grad(forward_only[..., 0].sum(), x, retain_graph=True)[0][0, 1:].any()
    backward_only = mixer.backward_scan(inner.flip(-1)).flip(-1)
    assert not torch.autograd.grad(backward_only[..., -1].sum(), x)[0][0, :-1].any()


def test_model_output_at_the_first_patch_depends_on_the_last_patch():
    model = tiny_ssm().eval()
    x, t, y = inputs(batch_size=1)
    changed = x.clone()
    changed[..., -2:, -2:] += 1.0  # the last patch in raster order
    delta = model(changed, t, y).sample - model(x, t, y).sample
    assert delta[..., :2, :2].abs().sum() > 0


# --- routing --------------------------------------------------------------------------------------------------------


def test_eval_output_with_routes_equals_the_model_without_routes():
    model = tiny_ssm(routes=[ROUTE]).eval()
    dense = TreadSSM2DModel(**{**TINY_SSM, "routes": []}).eval()
    dense.load_state_dict(model.state_dict())
    x, t, y = inputs()
    out = model(x, t, y)
    assert isinstance(out, TreadTransformer2DModelOutput) and out.route_masks is None
    assert torch.equal(out.sample, dense(x, t, y).sample)
    assert out.sample.shape == (3, 8, 8, 8)
    (sample,) = model(x, t, y, return_dict=False)
    assert torch.equal(sample, out.sample)


def test_ratio_zero_route_equals_dense_in_train_mode():
    model = tiny_ssm(routes=[ROUTE]).train()
    x, t, y = inputs()
    routed = model(x, t, y, selection_ratio=0.0)
    assert routed.route_masks[0].sum() == 0
    model.disable_routing()
    dense = model(x, t, y)
    assert dense.route_masks is None and model.config.routes == [ROUTE]
    assert torch.equal(routed.sample, dense.sample)
    model.enable_routing()
    assert model(x, t, y).route_masks is not None


@pytest.mark.parametrize("reinsertion", ["pre_route", "pre_route_plus_input"])
def test_routed_forward_is_reproducible_and_equals_routing_by_hand(reinsertion):
    model = tiny_ssm(routes=[ROUTE], route_reinsertion=reinsertion).train()
    x, t, y = inputs(batch_size=4)
    captured = {}
    model.norm_out.register_forward_pre_hook(lambda module, args: captured.__setitem__("final", args[0]))
    out = model(x, t, y, route_generator=torch.Generator().manual_seed(7))
    again = model(x, t, y, route_generator=torch.Generator().manual_seed(7))
    other = model(x, t, y, route_generator=torch.Generator().manual_seed(8))
    assert torch.equal(out.sample, again.sample) and not torch.equal(out.sample, other.sample)

    # By hand, with the blocks and the router's subset draw; the scatter is done with plain indexing.
    model(x, t, y, route_generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        tokens = model.pos_embed(x)
        conditioning = model.emb(t, y, hidden_dtype=tokens.dtype)
        pre_route = model.blocks[0](tokens, conditioning)
        kept = routing.sample_kept_indices(4, 16, 0.5, generator=torch.Generator().manual_seed(7))
        assert (kept.diff(dim=1) > 0).all()  # the scan sees the kept tokens in raster order
        routed = pre_route[torch.arange(4)[:, None], kept]
        for block in model.blocks[1:4]:
            routed = block(routed, conditioning)
        hidden = (pre_route if reinsertion == "pre_route" else pre_route + tokens).clone()
        for sample in range(4):
            hidden[sample, kept[sample]] = routed[sample]
        for block in model.blocks[4:]:
            hidden = block(hidden, conditioning)
    torch.testing.assert_close(captured["final"], hidden, rtol=1e-6, atol=1e-6)
    (mask,) = out.route_masks
    assert torch.equal(mask, routing.bypass_mask(kept, 16)) and mask.sum(1).tolist() == [8] * 4


def test_force_routing_per_route_ratios_and_multiple_routes():
    routes = [
        {"start_layer_idx": 0, "end_layer_idx": 1, "selection_ratio": 0.5},
        {"start_layer_idx": 3, "end_layer_idx": -2, "selection_ratio": 0.25},
    ]
    model = tiny_ssm(routes=routes).eval()
    assert model.config.routes[1]["end_layer_idx"] == 4
    x, t, y = inputs()
    sample, masks = model(x, t, y, force_routing=True, selection_ratio=[0.0, 0.75], return_dict=False)
    assert masks[0].sum(1).tolist() == [0, 0, 0] and masks[1].sum(1).tolist() == [12, 12, 12]
    with pytest.raises(ValueError, match="1 values for 2 routes"):
        model(x, t, y, force_routing=True, selection_ratio=[0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        model(x, t, y, force_routing=True, selection_ratio=1.0)


def count_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def test_routing_cuts_the_counted_flops_by_the_routed_blocks_share():
    """FlopCounterMode counts matmuls and convolutions: every Linear, the patch embedding, the depthwise conv1d and
    the scan's contractions (its bmm calls, forward and backward). The recurrence itself is elementwise and is not
    counted; it too scales with the number of tokens."""
    model = tiny_ssm(num_layers=8, sample_size=16, patch_size=2, routes=paper_routes(8)).train()
    x, t, y = inputs(batch_size=4, config={**TINY_SSM, "sample_size": 16})
    num_tokens, kept = 64, 32
    assert model.config.routes == [{"start_layer_idx": 2, "end_layer_idx": 4, "selection_ratio": 0.5}]

    def step():
        model(x, t, y, route_generator=torch.Generator().manual_seed(0)).sample.square().mean().backward()

    routed = count_flops(step)
    model.disable_routing()
    dense = count_flops(step)

    def block_step(tokens):  # one block, forward and backward, on `tokens` tokens
        hidden = torch.randn(4, tokens, 32, requires_grad=True)
        conditioning = torch.randn(4, 32, requires_grad=True)
        model.blocks[0](hidden, conditioning).square().mean().backward()

    saved_per_block = count_flops(lambda: block_step(num_tokens)) - count_flops(lambda: block_step(kept))
    assert routed == dense - 3 * saved_per_block  # exactly: the route runs 3 blocks on half the tokens
    # 3 of 8 blocks at half the tokens, plus the embeddings and the output layer at full cost
    assert 0.79 < routed / dense < 0.83


def test_gradients_reach_every_parameter_after_a_routed_backward():
    model = tiny_ssm(routes=[ROUTE]).train()
    x, t, y = inputs(batch_size=8)
    out = model(x, t, y, route_generator=torch.Generator().manual_seed(0))
    out.sample.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = tiny_ssm(routes=[ROUTE]).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        x, t, y = inputs(batch_size=4)
        loss = model(x, t, y, route_generator=torch.Generator().manual_seed(5)).sample.square().mean()
        loss.backward()
        return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}

    loss_plain, grads_plain = grads(False)
    loss_ckpt, grads_ckpt = grads(True)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)


# --- config, presets, saving ------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_route_override(tmp_path):
    model = tiny_ssm(
        routes=[{"start_layer_idx": 1, "end_layer_idx": -2, "selection_ratio": 0.4}],
        route_reinsertion="pre_route_plus_input",
    ).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "TreadSSM2DModel" and saved["hidden_size"] == 32 and saved["state_size"] == 8
    assert saved["routes"] == [{"start_layer_idx": 1, "end_layer_idx": 4, "selection_ratio": 0.4}]

    loaded = TreadSSM2DModel.from_pretrained(tmp_path)
    assert loaded.config.route_reinsertion == "pre_route_plus_input" and not loaded.training
    x, t, y = inputs()
    assert torch.equal(loaded(x, t, y).sample, model(x, t, y).sample)
    assert TreadSSM2DModel.from_pretrained(tmp_path, routes=[ROUTE]).config.routes == [ROUTE]

    bf16 = TreadSSM2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).train()
    out = bf16(x.bfloat16(), t, y)
    assert out.sample.dtype == torch.bfloat16 and out.sample.isfinite().all() and out.route_masks[0].shape == (3, 16)


def test_bin_weights_load_by_default_but_a_code_running_pickle_is_refused(tmp_path):
    """Diffusers' default: a ``.bin`` loads, through ``torch.load(weights_only=True)``, so only tensors come out."""
    from unsafe_pickle import assert_refused_by_weights_only, poison

    model = tiny_ssm()
    model.save_pretrained(tmp_path, safe_serialization=False)
    weights_file = tmp_path / "diffusion_pytorch_model.bin"
    loaded = TreadSSM2DModel.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    marker = tmp_path / "payload_ran"
    poison(weights_file, marker)
    with pytest.raises(OSError) as excinfo:
        TreadSSM2DModel.from_pretrained(tmp_path)
    assert_refused_by_weights_only(excinfo, weights_file, marker)


def test_invalid_config_raises_clear_errors():
    with pytest.raises(ValueError, match="outside the model's layers"):
        tiny_ssm(routes=[{"start_layer_idx": 2, "end_layer_idx": 6, "selection_ratio": 0.5}])
    with pytest.raises(ValueError, match="must not overlap"):
        tiny_ssm(routes=[ROUTE, {"start_layer_idx": 3, "end_layer_idx": 4, "selection_ratio": 0.5}])
    with pytest.raises(ValueError, match="selection_ratio must be in"):
        tiny_ssm(routes=[{**ROUTE, "selection_ratio": 1.0}])
    with pytest.raises(ValueError, match="needs exactly the keys"):
        tiny_ssm(routes=[{"start_layer_idx": 1, "end_layer_idx": 3}])
    with pytest.raises(ValueError, match="route_reinsertion must be one of"):
        tiny_ssm(route_reinsertion="x_T")


def test_presets_and_paper_route():
    assert set(SSM_PRESETS) == {"SSM-Tiny/2", "SSM-S/2", "SSM-B/2"}
    with torch.device("meta"):
        small = TreadSSM2DModel.from_preset("SSM-S/2")
        dense = TreadSSM2DModel.from_preset("SSM-B/2", routes=None)
    assert small.config.routes == [{"start_layer_idx": 2, "end_layer_idx": 8, "selection_ratio": 0.5}]
    assert small.config.hidden_size == 384 and small.out_channels == 8 and dense.config.routes == []
    tiny = TreadSSM2DModel.from_preset(
        "SSM-Tiny/2", in_channels=1, out_channels=None, sample_size=16, num_embeds_ada_norm=10
    )
    assert tiny.config.routes == [{"start_layer_idx": 2, "end_layer_idx": 4, "selection_ratio": 0.5}]
    assert tiny.out_channels == 1 and tiny.emb.class_embedder.embedding_table.num_embeddings == 11  # + null class
    out = tiny.train()(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([3, 10]))
    assert out.sample.shape == (2, 1, 16, 16) and len(out.route_masks) == 1
    assert not out.sample.any()  # adaLN-Zero and the zero output layer: a fresh model predicts 0
    with pytest.raises(ValueError, match=r"Unknown preset 'SSM-XL/2'; choose one of .*SSM-S/2"):
        TreadSSM2DModel.from_preset("SSM-XL/2")


def test_lora_on_the_mixer_projections_trains_with_routing_and_loads_into_the_pipeline(tmp_path):
    from peft import LoraConfig

    model = tiny_ssm(routes=[ROUTE]).eval()
    x, t, y = inputs()
    base = model(x, t, y).sample
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["in_proj", "out_proj"]))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    torch.testing.assert_close(model(x, t, y).sample, base)  # LoRA B starts at zero
    out = model.train()(x, t, y, route_generator=torch.Generator().manual_seed(0))
    out.sample.square().mean().backward()
    assert {name for name, param in model.named_parameters() if param.grad is not None} == trainable
    model.save_lora_adapter(tmp_path)

    fresh = tiny_ssm(routes=[ROUTE]).eval()
    pipe = TreadDiTPipeline(transformer=fresh, vae=None, scheduler=DDIMScheduler())
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(pipe.transformer(x, t, y).sample, model.eval()(x, t, y).sample)


# --- pipeline and Hub bundle ------------------------------------------------------------------------------------------


def test_pipeline_samples_an_ssm_and_round_trips(tmp_path):
    transformer = tiny_ssm(routes=[ROUTE], in_channels=1, out_channels=None).eval()
    pipe = TreadDiTPipeline(
        transformer=transformer, vae=None, scheduler=DDIMScheduler(), id2label={i: str(i) for i in range(10)}
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1, "7"], num_inference_steps=2, output_type="np")
    images = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    sparse = pipe(generator=torch.Generator().manual_seed(0), guidance="sparse", guidance_scale=2.0, **kwargs).images
    assert sparse.shape == images.shape and not np.array_equal(sparse, images)  # the routes ran at sampling

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_tread", "TreadSSM2DModel"] and index["vae"] == [None, None]
    loaded = TreadDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is TreadSSM2DModel and loaded.transformer.config.routes == [ROUTE]
    np.testing.assert_array_equal(loaded(generator=torch.Generator().manual_seed(0), **kwargs).images, images)


def test_remote_code_bundle_carries_the_ssm_model(tmp_path, monkeypatch):
    files = hub.remote_code_files(
        {"_class_name": "TreadDiTPipeline", "transformer": ["diffusers_tread", "TreadSSM2DModel"]}
    )
    path = tmp_path / "tread_dit.py"
    path.write_text(files["transformer/tread_dit.py"])
    # registered (dataclasses look their module up) under a name of its own, removed after the test by monkeypatch
    monkeypatch.setitem(sys.modules, "tread_ssm_bundle", None)
    bundle = load_module(path, "tread_ssm_bundle", register=True)
    model = tiny_ssm(routes=[ROUTE]).eval()
    copy = bundle.TreadSSM2DModel(**{**TINY_SSM, "routes": [ROUTE]}).eval()
    copy.load_state_dict(model.state_dict())
    x, t, y = inputs()
    assert torch.equal(copy(x, t, y).sample, model(x, t, y).sample)


def test_ssm_bundle_samples_with_diffusers_alone(tmp_path):
    # The SSM checkpoint's bundle: the pipeline module imports the DiT model, so transformer/tread_dit.py holds both.
    pipe = TreadDiTPipeline(transformer=tiny_ssm(routes=[ROUTE]).eval(), vae=None, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    hub.write_remote_code(tmp_path / "pipe")
    kwargs = dict(num_inference_steps=3, output_type="np", guidance="sparse")
    expected = pipe([0, 1], generator=torch.Generator().manual_seed(0), **kwargs).images
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "diffusers_tread":
            raise ModuleNotFoundError(name + " is blocked", name=name)
sys.meta_path.insert(0, Block())
import numpy as np, torch
torch.set_num_threads({torch.get_num_threads()})  # this file's one thread: the same reduction order as `expected`
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe([0, 1], generator=torch.Generator().manual_seed(0), **{kwargs!r}).images
np.save({str(tmp_path / "images.npy")!r}, images)
print(type(pipe.transformer).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-I", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split()[-1] == "TreadSSM2DModel"
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), expected, atol=1e-6)


# --- training script --------------------------------------------------------------------------------------------------


def test_training_arguments_for_the_ssm():
    script = load_script()
    args = script.parse_args(["--model_type=ssm"])
    assert args.model_config == "SSM-Tiny/2" and args.lora_target_modules == "in_proj,out_proj"
    args = script.parse_args([])
    assert args.model_config == "DiT-Tiny/2" and args.lora_target_modules == "to_q,to_k,to_v,to_out.0"
    with pytest.raises(SystemExit):
        script.parse_args(["--model_type=ssm", "--model_config=DiT-S/2"])
    with pytest.raises(SystemExit):
        script.parse_args(["--model_config=SSM-S/2"])


def test_train_script_trains_resumes_and_saves_a_loadable_ssm_pipeline(tmp_path, accelerate_config):
    out = tmp_path / "out"
    common = [
        f"--output_dir={out}",
        "--model_type=ssm",
        "--tread_loss=adapted",
        "--checkpointing_steps=2",
        "--validation_steps=100",
    ]
    launch(accelerate_config, *common, "--max_train_steps=2", "--gradient_checkpointing")
    checkpoint = out / "checkpoint-2"
    assert json.loads((checkpoint / "transformer" / "config.json").read_text())["_class_name"] == "TreadSSM2DModel"
    assert json.loads((checkpoint / "transformer_ema" / "config.json").read_text())["_class_name"] == "TreadSSM2DModel"
    # resume: the checkpoint hooks load the SSM weights and its EMA
    result = launch(accelerate_config, *common, "--max_train_steps=3", "--resume_from_checkpoint=latest")
    assert "Resuming from" in result.stdout + result.stderr
    assert [row.split(",")[0] for row in (out / "loss_history.csv").read_text().split()] == ["1", "2", "3"]

    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_tread", "TreadSSM2DModel"]
    pipe = TreadDiTPipeline.from_pretrained(out)
    assert type(pipe.transformer) is TreadSSM2DModel
    assert pipe.transformer.config.routes == [{"start_layer_idx": 2, "end_layer_idx": 4, "selection_ratio": 0.5}]
    assert pipe.transformer.config.hidden_size == 64 and pipe.transformer.config.num_layers == 8
    pipe.set_progress_bar_config(disable=True)
    images = pipe([3, "7"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert "Mamba" in (out / "README.md").read_text()

    # A DiT run refuses the SSM checkpoint and names the flag to use.
    command = [sys.executable, str(SCRIPT), *TINY, f"--output_dir={tmp_path / 'dit'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    refused = subprocess.run(
        [*command, f"--pretrained_model_name_or_path={out}"], env=env, capture_output=True, text=True, timeout=600
    )
    assert refused.returncode != 0 and "holds a TreadSSM2DModel; train it with --model_type ssm" in refused.stderr

    # push_to_hub.py turns the SSM checkpoint into a pipeline folder (EMA weights) with a Mamba card.
    push = load_module(SCRIPT.parent / "push_to_hub.py")
    staged = Path(push.main([str(checkpoint), "--hub_model_id=user/ssm-tiny", f"--save_to={tmp_path / 'staged'}"]))
    pushed = TreadDiTPipeline.from_pretrained(staged)
    assert type(pushed.transformer) is TreadSSM2DModel
    ema = TreadSSM2DModel.from_pretrained(checkpoint / "transformer_ema")
    for name, tensor in ema.state_dict().items():
        torch.testing.assert_close(pushed.transformer.state_dict()[name], tensor, rtol=0, atol=0)
    card = (staged / "README.md").read_text()
    assert "bidirectional Mamba, 8 layers, width 64, patch 2" in card and "| steps | 2 |" in card


def test_card_of_a_saved_ssm_pipeline_names_its_backbone(tmp_path):
    """A pipeline folder without the training run's card info still gets the right backbone on its model card."""
    model = TreadSSM2DModel.from_preset("SSM-Tiny/2", in_channels=1, sample_size=8, num_embeds_ada_norm=4)
    TreadDiTPipeline(transformer=model, vae=None, scheduler=DDIMScheduler()).save_pretrained(tmp_path)
    info = hub.card_info_from_folder(tmp_path)
    assert info.model_class == "TreadSSM2DModel"
    assert info.backbone == "bidirectional Mamba, 8 layers, width 64, patch 2" and info.num_tokens == 16
