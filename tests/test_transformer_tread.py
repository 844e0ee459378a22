import json

import pytest
import torch
from conftest import TINY_CONFIG, stock_twin, tiny_inputs, tiny_tread
from diffusers import DiTTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from diffusers_tread import PRESETS, TreadTransformer2DModel, TreadTransformer2DModelOutput, routing

ROUTE = {"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.5}


# --- drop-in equivalence with stock DiT -------------------------------------------------------------------------


@pytest.mark.parametrize("routes", [[], [ROUTE]])
def test_eval_output_equals_stock_dit_bit_for_bit(routes):
    model = tiny_tread(routes=routes).eval()
    stock = stock_twin(model).eval()
    x, t, y = tiny_inputs(model=model)
    out = model(x, timestep=t, class_labels=y)
    ref = stock(x, timestep=t, class_labels=y)
    assert torch.equal(out.sample, ref.sample)
    assert out.route_masks is None
    assert isinstance(out, Transformer2DModelOutput)
    assert list(out.keys()) == list(ref.keys()) == ["sample"]
    tuple_out = model(x, timestep=t, class_labels=y, return_dict=False)
    assert len(tuple_out) == 1 and torch.equal(tuple_out[0], ref.sample)


def test_train_mode_without_routes_equals_stock_eval_because_label_dropout_is_off():
    model = tiny_tread().train()
    stock = stock_twin(model).eval()
    x, t, y = tiny_inputs(batch_size=16, model=model)
    assert all(block.norm1.emb.class_embedder.dropout_prob == 0.0 for block in model.transformer_blocks)
    out = model(x, timestep=t, class_labels=y)
    assert out.route_masks is None
    # Training computes q, k, v with one fused matmul (DiT's qkv layer), whose float summation order may differ from
    # three matmuls on some BLAS paths: equal up to float32 rounding (bit-equal in eval, tested above).
    torch.testing.assert_close(out.sample, stock(x, timestep=t, class_labels=y).sample, rtol=0, atol=1e-5)
    # the null-class row of the label table is still there for CFG
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11


def test_state_dict_has_exactly_dit_keys_and_no_new_parameters():
    model = tiny_tread(routes=[ROUTE])
    stock = stock_twin(model)
    assert model.state_dict().keys() == stock.state_dict().keys()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in stock.parameters())


def test_stock_dit_folder_loads_into_tread(tmp_path):
    torch.manual_seed(0)
    stock = DiTTransformer2DModel(**TINY_CONFIG).eval()
    stock.save_pretrained(tmp_path / "dit")
    model = TreadTransformer2DModel.from_pretrained(tmp_path / "dit", routes=[ROUTE])
    assert model.config.routes == [ROUTE] and not model.training
    x, t, y = tiny_inputs(model=model)
    assert torch.equal(model(x, t, y).sample, stock(x, t, y).sample)


def test_legacy_transformer2d_config_loads_into_tread(tmp_path):
    """The official facebook/DiT-XL-2-* checkpoints still carry a legacy `Transformer2DModel` config."""
    torch.manual_seed(0)
    stock = DiTTransformer2DModel(**TINY_CONFIG).eval()
    stock.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(
        _class_name="Transformer2DModel",
        _diffusers_version="0.12.0.dev0",
        norm_type="ada_norm_zero",
        cross_attention_dim=None,
        num_vector_embeds=None,
        use_linear_projection=False,
        only_cross_attention=False,
    )
    config.pop("norm_eps")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = TreadTransformer2DModel.from_pretrained(tmp_path)
    assert isinstance(model, TreadTransformer2DModel) and model.config.routes == []
    x, t, y = tiny_inputs(model=model)
    assert torch.equal(model(x, t, y).sample, stock(x, t, y).sample)


def test_from_dit_shares_weights_and_keeps_mode():
    torch.manual_seed(0)
    stock = DiTTransformer2DModel(**TINY_CONFIG).eval()
    model = TreadTransformer2DModel.from_dit(stock, routes=[ROUTE])
    assert not model.training and model.config.routes == [ROUTE]
    assert model.proj_out_2.weight.data_ptr() == stock.proj_out_2.weight.data_ptr()
    x, t, y = tiny_inputs(model=model)
    assert torch.equal(model(x, t, y).sample, stock(x, t, y).sample)
    assert model.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob == 0.0


# --- routing semantics ----------------------------------------------------------------------------------------------


def record_block_inputs(model):
    """Hooks that record every block's input and output and the patch-embedded input tokens."""
    records = {"in": {}, "out": {}}
    handles = [model.pos_embed.register_forward_hook(lambda m, a, o: records.__setitem__("tokens", o))]
    for i, block in enumerate(model.transformer_blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: records["in"].__setitem__(i, a[0])))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: records["out"].__setitem__(i, o)))
    return records, handles


@pytest.mark.parametrize("reinsertion", ["pre_route", "pre_route_plus_input"])
def test_route_semantics_seen_by_hooks(reinsertion):
    model = tiny_tread(routes=[ROUTE], route_reinsertion=reinsertion).train()
    records, _ = record_block_inputs(model)
    x, t, y = tiny_inputs(batch_size=4, model=model)
    out = model(x, t, y, route_generator=torch.Generator().manual_seed(7))

    num_tokens = 16  # (8 / 2) ** 2
    assert [records["in"][i].shape[1] for i in range(6)] == [16, 8, 8, 8, 16, 16]
    kept = routing.sample_kept_indices(4, num_tokens, 0.5, generator=torch.Generator().manual_seed(7))
    (mask,) = out.route_masks
    assert torch.equal(mask, routing.bypass_mask(kept, num_tokens))
    assert mask.sum(dim=1).tolist() == [8, 8, 8, 8]

    pre_route = records["out"][0]  # the full sequence entering block 1, the route's first block
    assert torch.equal(records["in"][1], routing.gather_tokens(pre_route, kept))
    after_route = records["in"][4]
    expected_bypass = pre_route if reinsertion == "pre_route" else pre_route + records["tokens"]
    assert torch.equal(after_route[mask], expected_bypass[mask])
    assert torch.equal(routing.gather_tokens(after_route, kept), records["out"][3])


def test_multiple_routes_each_draw_their_own_subset():
    routes = [
        {"start_layer_idx": 0, "end_layer_idx": 1, "selection_ratio": 0.5},
        {"start_layer_idx": 3, "end_layer_idx": -2, "selection_ratio": 0.25},
    ]
    model = tiny_tread(routes=routes).train()
    assert model.config.routes[1]["end_layer_idx"] == 4
    records, _ = record_block_inputs(model)
    x, t, y = tiny_inputs(batch_size=4, model=model)
    out = model(x, t, y, route_generator=torch.Generator().manual_seed(3))
    assert [records["in"][i].shape[1] for i in range(6)] == [8, 8, 16, 12, 12, 16]
    first, second = out.route_masks
    assert first.sum(1).tolist() == [8] * 4 and second.sum(1).tolist() == [4] * 4
    # route 2 stores the state after route 1 closed; its bypassed tokens carry block 3's input
    assert torch.equal(records["in"][5][second], records["out"][2][second])
    assert torch.equal(records["in"][2][first], records["tokens"][first])


def test_force_routing_selection_ratio_override_and_tuple_output():
    model = tiny_tread(routes=[ROUTE]).eval()
    x, t, y = tiny_inputs(model=model)
    sample, masks = model(x, t, y, force_routing=True, selection_ratio=0.25, return_dict=False)
    assert sample.shape == (3, 8, 8, 8) and masks[0].sum(1).tolist() == [4, 4, 4]
    # ratio 0 keeps every token: identical to dense
    dense = model(x, t, y).sample
    assert torch.equal(model(x, t, y, force_routing=True, selection_ratio=0.0).sample, dense)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        model(x, t, y, force_routing=True, selection_ratio=1.0)


def test_disable_routing_trains_on_all_tokens_and_keeps_the_routes():
    model = tiny_tread(routes=[ROUTE]).train()
    x, t, y = tiny_inputs(model=model)
    model.disable_routing()
    out = model(x, t, y)
    assert out.route_masks is None and model.config.routes == [ROUTE]
    # up to float32 rounding: training fuses the q, k, v matmuls (see test_train_mode_without_routes_...)
    torch.testing.assert_close(out.sample, stock_twin(model).eval()(x, t, y).sample, rtol=0, atol=1e-5)
    assert model(x, t, y, force_routing=True).route_masks is not None
    model.enable_routing()
    assert model(x, t, y).route_masks is not None


def test_route_generator_makes_routing_reproducible():
    model = tiny_tread(routes=[ROUTE]).train()
    x, t, y = tiny_inputs(model=model)
    a = model(x, t, y, route_generator=torch.Generator().manual_seed(1)).sample
    b = model(x, t, y, route_generator=torch.Generator().manual_seed(1)).sample
    c = model(x, t, y, route_generator=torch.Generator().manual_seed(2)).sample
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_reaches_every_parameter_with_routing():
    model = tiny_tread(routes=[ROUTE]).train()
    x, t, y = tiny_inputs(batch_size=8, model=model)
    model(x, t, y, route_generator=torch.Generator().manual_seed(0)).sample.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("shared_conditioning", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(shared_conditioning):
    def grads(checkpointing):
        model = tiny_tread(routes=[ROUTE], shared_conditioning=shared_conditioning).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        x, t, y = tiny_inputs(batch_size=4, model=model)
        loss = model(x, t, y, route_generator=torch.Generator().manual_seed(5)).sample.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, grads_plain = grads(False)
    loss_ckpt, grads_ckpt = grads(True)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_fuses_qkv_and_matches_separate_projections():
    model = tiny_tread().train()
    x, t, y = tiny_inputs(batch_size=4, model=model)
    fused = model(x, t, y).sample
    fused.square().mean().backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():  # eval's path: three separate projections
        separate = model.eval()(x, t, y).sample
    torch.testing.assert_close(fused.detach(), separate, rtol=0, atol=1e-5)
    # the reference gradients: the separate path (forced by a non-Linear wrapper type check) under grad
    for block in model.transformer_blocks:
        block.attn1.to_q.__class__ = type("Projection", (torch.nn.Linear,), {})
    model.train()(x, t, y).sample.square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_with_layerwise_casting_runs_the_casting_projections():
    """Diffusers' `enable_layerwise_casting` stores weights in fp16 and casts them to fp32 in each layer's (replaced)
    forward; the fused q/k/v matmul reads weights directly, so it must leave such layers to their own forward."""
    model, reference = tiny_tread().train(), tiny_tread().train()
    model.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    stored = model.state_dict()
    assert stored["transformer_blocks.0.attn1.to_q.weight"].dtype == torch.float16
    reference.load_state_dict({key: value.float() for key, value in stored.items()})  # the same weights, in fp32
    x, t, y = tiny_inputs(batch_size=4, model=model)
    output = model(x, t, y).sample
    output.square().mean().backward()
    torch.testing.assert_close(output, reference(x, t, y).sample, rtol=0, atol=1e-5)


def test_gradient_checkpointing_is_applied_to_the_top_model_only():
    model = tiny_tread()
    model.enable_gradient_checkpointing()
    applied = {type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)}
    assert applied == {"TreadTransformer2DModel"}


# --- one conditioning embedding per forward (shared_conditioning) -------------------------------------------------


def stock_with_identical_embedders(seed: int = 0) -> DiTTransformer2DModel:
    """A stock DiT whose blocks all hold block 0's timestep/label embedder: what a converted DiT checkpoint is."""
    torch.manual_seed(seed)
    stock = DiTTransformer2DModel(**TINY_CONFIG).eval()
    for block in stock.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(stock.transformer_blocks[0].norm1.emb.state_dict())
    return stock


def test_shared_conditioning_computes_what_stock_dit_computes_with_identical_embedders():
    stock = stock_with_identical_embedders()
    model = TreadTransformer2DModel.from_dit(stock, shared_conditioning=True)
    assert model.config.shared_conditioning and not model.training
    assert all(block.norm1.emb is None for block in model.transformer_blocks)
    # 5 fewer parameter tensors per block beyond the first (2 linear layers, the label table), same outputs
    stock_count = sum(p.numel() for p in stock.parameters())
    per_block = sum(p.numel() for p in stock.transformer_blocks[0].norm1.emb.parameters())
    assert sum(p.numel() for p in model.parameters()) == stock_count - (TINY_CONFIG["num_layers"] - 1) * per_block
    x, t, y = tiny_inputs(model=model)
    assert torch.equal(model(x, t, y).sample, stock(x, t, y).sample)
    # train mode without routes: the same numbers (label dropout is off), as in Diffusers' layout
    assert model.conditioning_embedder.class_embedder.dropout_prob == 0.0
    torch.testing.assert_close(model.train()(x, t, y).sample, stock(x, t, y).sample, rtol=0, atol=1e-5)


def test_shared_conditioning_refuses_per_block_embedders_that_differ():
    torch.manual_seed(0)
    stock = DiTTransformer2DModel(**TINY_CONFIG)  # independently initialised embedders
    with pytest.raises(ValueError, match="Block 1's timestep/label embedder differs.*shared_conditioning=False"):
        TreadTransformer2DModel.from_dit(stock, shared_conditioning=True)


def test_shared_model_exports_to_stock_dit_exactly(tmp_path):
    model = tiny_tread(routes=[ROUTE], shared_conditioning=True).eval()
    stock = model.to_dit()
    assert type(stock) is DiTTransformer2DModel and "shared_conditioning" not in stock.config
    x, t, y = tiny_inputs(model=model)
    assert torch.equal(stock(x, t, y).sample, model(x, t, y).sample)
    shared = {
        k.removeprefix("conditioning_embedder."): v for k, v in model.state_dict().items() if "conditioning" in k
    }
    for i, block in enumerate(stock.transformer_blocks):
        for name, value in block.norm1.emb.state_dict().items():
            assert torch.equal(value, shared[name]) and value.data_ptr() != shared[name].data_ptr(), (i, name)
    # stock Diffusers loads the export; loading it back as the shared form gives the same weights
    stock.save_pretrained(tmp_path)
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded(x, t, y).sample, model(x, t, y).sample)
    back = TreadTransformer2DModel.from_pretrained(tmp_path, shared_conditioning=True, routes=[ROUTE])
    assert back.config.shared_conditioning and back.config.routes == [ROUTE]
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    # and a shared model saves and loads as itself
    model.save_pretrained(tmp_path / "shared")
    assert json.loads((tmp_path / "shared" / "config.json").read_text())["shared_conditioning"] is True
    assert torch.equal(
        TreadTransformer2DModel.from_pretrained(tmp_path / "shared")(x, t, y).sample, stock(x, t, y).sample
    )


def test_per_block_copies_train_independently_after_unsharing():
    model = tiny_tread(shared_conditioning=True)
    per_block = TreadTransformer2DModel.from_dit(model, shared_conditioning=False)
    pointers = {block.norm1.emb.timestep_embedder.linear_1.weight.data_ptr() for block in per_block.transformer_blocks}
    assert len(pointers) == TINY_CONFIG["num_layers"]  # separate tensors, as Diffusers' layout has
    x, t, y = tiny_inputs(model=model)
    assert torch.equal(per_block.eval()(x, t, y).sample, model.eval()(x, t, y).sample)


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_override(tmp_path):
    model = tiny_tread(
        routes=[{"start_layer_idx": 1, "end_layer_idx": -2, "selection_ratio": 0.4}],
        route_reinsertion="pre_route_plus_input",
    )
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "TreadTransformer2DModel"
    assert saved["routes"] == [{"start_layer_idx": 1, "end_layer_idx": 4, "selection_ratio": 0.4}]
    assert saved["route_reinsertion"] == "pre_route_plus_input"

    loaded = TreadTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.routes == saved["routes"] and loaded.config.route_reinsertion == "pre_route_plus_input"
    x, t, y = tiny_inputs(model=model)
    assert torch.equal(loaded(x, t, y).sample, model.eval()(x, t, y).sample)

    overridden = TreadTransformer2DModel.from_pretrained(tmp_path, routes=[ROUTE], route_reinsertion="pre_route")
    assert overridden.config.routes == [ROUTE] and overridden.config.route_reinsertion == "pre_route"
    assert TreadTransformer2DModel.from_pretrained(tmp_path, routes=[]).config.routes == []


def test_invalid_config_raises_clear_errors():
    with pytest.raises(ValueError, match="outside the model's layers"):
        tiny_tread(routes=[{"start_layer_idx": 2, "end_layer_idx": 6, "selection_ratio": 0.5}])
    with pytest.raises(ValueError, match="route_reinsertion must be one of"):
        tiny_tread(route_reinsertion="x_T")


def test_bf16_load_and_forward(tmp_path):
    tiny_tread(routes=[ROUTE]).save_pretrained(tmp_path)
    model = TreadTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).train()
    x, t, y = tiny_inputs(model=model)
    out = model(x.bfloat16(), t, y)
    assert out.sample.dtype == torch.bfloat16 and out.route_masks[0].shape == (3, 16)


# --- presets --------------------------------------------------------------------------------------------------------


def test_presets_cover_paper_sizes_and_default_route():
    assert {f"DiT-{s}/{p}" for s in "S B L XL".split() for p in (2, 4, 8)} | {"DiT-Tiny/2"} == set(PRESETS)
    with torch.device("meta"):
        xl = TreadTransformer2DModel.from_preset("DiT-XL/2")
        b = TreadTransformer2DModel.from_preset("DiT-B/4", routes=None)
        dense = TreadTransformer2DModel.from_preset("DiT-S/8", routes=[])
        per_block = TreadTransformer2DModel.from_preset("DiT-XL/2", shared_conditioning=False)
    assert xl.config.routes == [{"start_layer_idx": 2, "end_layer_idx": 24, "selection_ratio": 0.5}]
    # One timestep+label embedder, as DiT: 674,834,720 trainable parameters, the count of CompVis/tread's and
    # facebookresearch/DiT's DiT-XL/2 (learned sigma) without their frozen pos_embed; the paper's "675M" (Table 1).
    assert xl.config.shared_conditioning and sum(p.numel() for p in xl.parameters()) == 674_834_720
    # Diffusers' layout has a timestep+label embedder per block: 749.8M parameters (DIFFUSERS.md)
    assert round(sum(p.numel() for p in per_block.parameters()) / 1e6, 1) == 749.8
    assert xl.config.out_channels == 8 and xl.config.sample_size == 32 and xl.inner_dim == 1152
    assert b.config.routes == [] and b.config.patch_size == 4 and b.inner_dim == 768
    assert dense.config.routes == []


def test_preset_overrides_and_tiny():
    model = TreadTransformer2DModel.from_preset(
        "DiT-Tiny/2", in_channels=1, out_channels=None, sample_size=16, num_embeds_ada_norm=10
    )
    assert model.config.routes == [{"start_layer_idx": 2, "end_layer_idx": 4, "selection_ratio": 0.5}]
    assert model.config.in_channels == 1 and model.out_channels == 1 and model.config.num_embeds_ada_norm == 10
    out = model.train()(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert out.sample.shape == (2, 1, 16, 16) and len(out.route_masks) == 1


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown preset 'DiT-XXL/2'; choose one of .*DiT-XL/2"):
        TreadTransformer2DModel.from_preset("DiT-XXL/2")
    with pytest.raises(ValueError, match="routes must be 'paper'"):
        TreadTransformer2DModel.from_preset("DiT-S/2", routes="default")


# --- LoRA -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_conditioning", [False, True])
def test_lora_attaches_and_trains_with_routing(shared_conditioning):
    from peft import LoraConfig

    model = tiny_tread(routes=[ROUTE], shared_conditioning=shared_conditioning).eval()
    x, t, y = tiny_inputs(model=model)
    base = model(x, t, y).sample
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # LoRA B starts at zero: the adapted model equals the base model until trained
    torch.testing.assert_close(model(x, t, y).sample, base)
    out = model.train()(x, t, y, route_generator=torch.Generator().manual_seed(0))
    assert len(out.route_masks) == 1
    out.sample.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == trainable
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert isinstance(out, TreadTransformer2DModelOutput)


def test_bin_weights_load_by_default_but_a_code_running_pickle_is_refused(tmp_path):
    """Diffusers' default (as DiTTransformer2DModel): a ``.bin`` loads, through ``torch.load(weights_only=True)``."""
    from unsafe_pickle import assert_refused_by_weights_only, poison

    model = tiny_tread(routes=[ROUTE])
    model.save_pretrained(tmp_path, safe_serialization=False)  # a pickled diffusion_pytorch_model.bin
    weights_file = tmp_path / "diffusion_pytorch_model.bin"
    assert weights_file.exists() and not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = TreadTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.routes == [ROUTE] and loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    marker = tmp_path / "payload_ran"
    poison(weights_file, marker)
    with pytest.raises(OSError) as excinfo:
        TreadTransformer2DModel.from_pretrained(tmp_path)
    assert_refused_by_weights_only(excinfo, weights_file, marker)
    torch.load(weights_file, weights_only=False)  # the payload is live: an unrestricted unpickler runs it
    assert marker.read_text() == "ran"


def test_per_route_selection_ratio_override():
    routes = [
        {"start_layer_idx": 0, "end_layer_idx": 1, "selection_ratio": 0.5},
        {"start_layer_idx": 3, "end_layer_idx": 4, "selection_ratio": 0.25},
    ]
    model = tiny_tread(routes=routes).train()
    x, t, y = tiny_inputs(model=model)
    masks = model(x, t, y, selection_ratio=[0.0, 0.75]).route_masks
    assert masks[0].sum(1).tolist() == [0, 0, 0] and masks[1].sum(1).tolist() == [12, 12, 12]
    with pytest.raises(ValueError, match="1 values for 2 routes"):
        model(x, t, y, selection_ratio=[0.5])
