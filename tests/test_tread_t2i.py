"""TREAD routing on stock Diffusers text-to-image transformers (PixArt, SD3, Flux) via `apply_tread`.

Tiny random configs with 6 blocks each (Flux: 2 double-stream + 4 single-stream), 16 image tokens, 5 text tokens.
"""

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from torch.utils.flop_counter import FlopCounterMode

from diffusers_tread import TreadTransformer2DModel, routing
from diffusers_tread.models.tread_t2i import TreadRouter, apply_tread, attached_router
from diffusers_tread.profiling import CPU_SDPA_FLOPS

BATCH, TEXT, GRID, WIDTH = 3, 5, 4, 16  # 4x4 = 16 image tokens, inner dim 16
ROUTE = {"start_layer_idx": 1, "end_layer_idx": 4, "selection_ratio": 0.5}  # Flux: double block 1 .. single block 2
TWO_ROUTES = [
    {"start_layer_idx": 1, "end_layer_idx": 2, "selection_ratio": 0.5},
    {"start_layer_idx": 3, "end_layer_idx": 4, "selection_ratio": 0.25},
]
MODELS = ["pixart", "sd3", "flux"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and does not spin against other jobs on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name == "pixart":
        return PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=6,
            cross_attention_dim=WIDTH,
            sample_size=2 * GRID,
            patch_size=2,
            caption_channels=12,
            use_additional_conditions=False,
        )
    if name == "sd3":
        return SD3Transformer2DModel(
            sample_size=2 * GRID,
            patch_size=2,
            in_channels=4,
            num_layers=6,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=12,
            caption_projection_dim=WIDTH,
            pooled_projection_dim=10,
            out_channels=4,
            pos_embed_max_size=2 * GRID,
            dual_attention_layers=(0, 1, 2),  # SD3.5-style extra image self-attention in some routed blocks
            qk_norm="rms_norm",
        )
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        axes_dims_rope=(2, 2, 4),
    )


def make_inputs(name: str, seed: int = 0, batch_size: int = BATCH) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch_size, TEXT, 12, generator=g)
    if name == "flux":
        rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        return dict(
            hidden_states=torch.randn(batch_size, GRID * GRID, 4, generator=g),
            encoder_hidden_states=text,
            pooled_projections=torch.randn(batch_size, 10, generator=g),
            timestep=torch.rand(batch_size, generator=g),
            img_ids=img_ids,
            txt_ids=torch.zeros(TEXT, 3),
        )
    inputs = dict(
        hidden_states=torch.randn(batch_size, 4, 2 * GRID, 2 * GRID, generator=g),
        encoder_hidden_states=text,
        timestep=torch.randint(0, 1000, (batch_size,), generator=g),
    )
    if name == "sd3":
        inputs["pooled_projections"] = torch.randn(batch_size, 10, generator=g)
    return inputs


def pair(name: str):
    """A routed model and an independent stock twin with the same weights."""
    model = make_model(name)
    stock = make_model(name)
    stock.load_state_dict(model.state_dict())
    return model, stock


def blocks_of(model) -> list:
    return list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))


def hook_counts(module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_hooks_always_called)
        for m in module.modules()
    )


def argument(name, args, kwargs):
    """A block argument however it was passed (PixArt passes hidden_states positionally, SD3/Flux by keyword)."""
    return kwargs[name] if name in kwargs else args[0]


def record(store: dict, key: str, pick):
    """A hook that stores ``pick(...)`` of its first call and changes nothing."""

    def hook(module, *inputs):
        store.setdefault(key, pick(*inputs))

    return hook


def loss_of(output) -> torch.Tensor:
    return output.sample.square().mean()


# --- (a) eval mode and enabled=False are the stock model ----------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_eval_output_equals_stock_bit_for_bit(name):
    model, stock = pair(name)
    keys_before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    router = apply_tread(model, [ROUTE])
    inputs = make_inputs(name)
    model.eval(), stock.eval()
    assert torch.equal(model(**inputs).sample, stock(**inputs).sample)
    assert router.route_masks is None
    # enabled=False in train mode: the stock train-mode forward
    model.train(), stock.train()
    router.enabled = False
    assert torch.equal(model(**inputs).sample, stock(**inputs).sample)
    assert router.route_masks is None
    # nothing was added to the model
    state = model.state_dict()
    assert state.keys() == keys_before.keys() and all(torch.equal(state[k], v) for k, v in keys_before.items())


# --- (b) a routed training step and its FLOPs ------------------------------------------------------------------------


def train_step_flops(model, inputs) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        loss_of(model(**inputs)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def block_flops(name: str, index: int, n: int) -> int:
    """Forward + backward matmul FLOPs of block ``index`` on ``n`` image tokens (+ the text tokens), counting a linear
    layer as 6 * tokens * in * out (2 forward, 4 backward) and attention as 14 * Sq * Sk * width (4 forward, 2.5x that
    backward, torch's flop_counter formulas). Terms that do not depend on ``n`` cancel in the routed-vs-dense
    difference and may be left out."""
    d, t = WIDTH, TEXT
    if name == "pixart":  # self-attn (4 linears), cross-attn q/out, 4x MLP; attention n*n and n*t
        per_sample = (24 + 12 + 48) * n * d * d + 14 * n * n * d + 14 * n * t * d
    elif name == "sd3":  # MMDiT: image q/k/v/out + 4x MLP, joint attention over text + image (+ SD3.5 attn2)
        per_sample = 72 * n * d * d + 14 * (t + n) ** 2 * d
        if index in (0, 1, 2):
            per_sample += 24 * n * d * d + 14 * n * n * d
    elif index < 2:  # Flux double-stream block: as MMDiT
        per_sample = 72 * n * d * d + 14 * (t + n) ** 2 * d
    else:  # Flux single-stream block over [text; image]: q/k/v, 4x MLP in, (1 + 4) x width out
        per_sample = (18 + 24 + 30) * (t + n) * d * d + 14 * (t + n) ** 2 * d
    return BATCH * per_sample


@pytest.mark.parametrize("name", MODELS)
def test_routed_train_step_runs_and_flops_drop_by_the_expected_share(name):
    model = make_model(name).train()
    router = apply_tread(model, TWO_ROUTES, generator=torch.Generator().manual_seed(0))
    inputs = make_inputs(name)
    router.enabled = False
    dense = train_step_flops(model, inputs)
    router.enabled = True
    routed = train_step_flops(model, inputs)

    num_tokens = GRID * GRID
    saved = 0
    for route in TWO_ROUTES:
        kept = routing.num_kept_tokens(num_tokens, route["selection_ratio"])
        for index in range(route["start_layer_idx"], route["end_layer_idx"] + 1):
            saved += block_flops(name, index, num_tokens) - block_flops(name, index, kept)
    assert routed == dense - saved  # exact: routed blocks run on the kept tokens, every other op is unchanged
    assert 0.1 < saved / dense < 0.5  # a real share of the step (blocks dominate; embedders and heads are small)

    # and a full optimiser step on the routed model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    output = model(**inputs)
    assert [tuple(mask.shape) for mask in router.route_masks] == [(BATCH, num_tokens)] * 2
    loss_of(output).backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert output.sample.shape == model.eval()(**inputs).sample.shape


# --- (c) gradients reach every trainable parameter -------------------------------------------------------------------


def params_without_grad(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}


# Parameters the *stock* model's loss never reaches, whatever the routing:
NO_GRAD_IN_STOCK = {
    "pixart": set(),
    # SD3's last block is `context_pre_only`: its text stream output is dropped, so the text queries do not matter.
    "sd3": {
        f"transformer_blocks.5.attn.{name}" for name in ("add_q_proj.weight", "add_q_proj.bias", "norm_added_q.weight")
    },
    # Flux's last single block returns the text tokens, which the model drops; no parameter is text-only there.
    "flux": set(),
}


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_trainable_parameter(name):
    model, stock = pair(name)
    model.train(), stock.train()
    router = apply_tread(model, [ROUTE], generator=torch.Generator().manual_seed(0))
    inputs = make_inputs(name)
    loss_of(stock(**inputs)).backward()
    assert params_without_grad(stock) == NO_GRAD_IN_STOCK[name]
    loss_of(model(**inputs)).backward()
    assert router.route_masks is not None
    assert params_without_grad(model) == NO_GRAD_IN_STOCK[name]


# --- (d) bypassed tokens re-enter with their pre-route state; ratio 0 is dense --------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("route", [ROUTE, {"start_layer_idx": 3, "end_layer_idx": -1, "selection_ratio": 0.3}])
def test_bypassed_tokens_come_back_with_their_pre_route_state(name, route):
    model = make_model(name).train()
    router = apply_tread(model, [route], generator=torch.Generator().manual_seed(1))
    start, end = router.routes[0]["start_layer_idx"], router.routes[0]["end_layer_idx"]
    blocks = blocks_of(model)
    seen = {}
    # prepend=True: runs before the router's hooks (full input / raw routed output); the last hook runs after them.
    pre_route = record(seen, "pre_route", lambda args, kwargs: argument("hidden_states", args, kwargs))
    blocks[start].register_forward_pre_hook(pre_route, with_kwargs=True, prepend=True)
    hidden = (lambda args, out: out) if name == "pixart" else (lambda args, out: out[1])
    blocks[end].register_forward_hook(record(seen, "routed", hidden), prepend=True)
    blocks[end].register_forward_hook(record(seen, "after", hidden))
    model(**make_inputs(name))

    (mask,) = router.route_masks
    num_tokens = GRID * GRID
    assert mask.shape == (BATCH, num_tokens)
    assert (mask.sum(1) == int(num_tokens * route["selection_ratio"])).all()
    assert not (mask == mask[0]).all(), "subsets are drawn per sample"
    kept = num_tokens - mask[0].sum()
    assert seen["pre_route"].shape[1] == num_tokens and seen["routed"].shape[1] == kept
    assert seen["after"].shape == seen["pre_route"].shape
    assert torch.equal(seen["after"][mask], seen["pre_route"][mask])  # bypassed: the state entering block `start`
    assert torch.equal(seen["after"][~mask], seen["routed"].flatten(0, 1))  # kept: the route's output, in order


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_v1_reinsertion_adds_the_input_tokens_to_the_bypassed_ones(name, checkpointing):
    model = make_model(name).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    router = apply_tread(model, [ROUTE], torch.Generator().manual_seed(1), route_reinsertion="pre_route_plus_input")
    start, end = router.routes[0]["start_layer_idx"], router.routes[0]["end_layer_idx"]
    blocks = blocks_of(model)
    seen = {}
    first = record(seen, "input", lambda args, kwargs: argument("hidden_states", args, kwargs))
    blocks[0].register_forward_pre_hook(first, with_kwargs=True, prepend=True)
    pre_route = record(seen, "pre_route", lambda args, kwargs: argument("hidden_states", args, kwargs))
    blocks[start].register_forward_pre_hook(pre_route, with_kwargs=True, prepend=True)
    hidden = (lambda args, out: out) if name == "pixart" else (lambda args, out: out[1])
    blocks[end].register_forward_hook(record(seen, "after", hidden))
    output = model(**make_inputs(name)).sample
    (mask,) = router.route_masks
    if not checkpointing:  # with checkpointing the block hooks are suspended inside the checkpoint
        # bypassed: the state entering block `start` plus the image tokens entering block 0 (v1's x_D_last + x_T)
        assert torch.equal(seen["after"][mask], (seen["pre_route"] + seen["input"])[mask])
    output.square().mean().backward()
    with pytest.raises(ValueError, match="route_reinsertion must be one of"):
        apply_tread(make_model(name), [ROUTE], route_reinsertion="input")


@pytest.mark.parametrize("name", MODELS)
def test_ratio_zero_in_train_mode_equals_dense_and_routing_changes_the_output(name):
    model, stock = pair(name)
    model.train(), stock.train()
    router = apply_tread(model, [ROUTE])
    inputs = make_inputs(name)
    dense = stock(**inputs).sample
    assert not torch.allclose(model(**inputs).sample, dense)
    router.selection_ratio = 0.0
    assert torch.equal(model(**inputs).sample, dense)
    assert router.route_masks is not None and not router.route_masks[0].any()


@pytest.mark.parametrize("name", MODELS)
def test_force_routes_in_eval_mode(name):
    model = make_model(name).eval()
    router = apply_tread(model, [ROUTE])
    router.force = True
    with torch.no_grad():
        model(**make_inputs(name))
    assert router.route_masks is not None and len(router.route_masks) == 1


# --- (e) text tokens are never routed --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_text_tokens_are_never_routed(name):
    model = make_model(name).train()
    router = apply_tread(model, TWO_ROUTES)
    lengths = []
    for block in blocks_of(model):  # registered after the router's hooks: sees what the block really gets
        block.register_forward_pre_hook(
            lambda m, args, kwargs: lengths.append(
                (argument("hidden_states", args, kwargs).shape[1], kwargs["encoder_hidden_states"].shape[1])
            ),
            with_kwargs=True,
        )
    model(**make_inputs(name))
    kept = [routing.num_kept_tokens(GRID * GRID, r["selection_ratio"]) for r in router.routes]
    assert lengths == [(16, TEXT), (kept[0], TEXT), (kept[0], TEXT), (kept[1], TEXT), (kept[1], TEXT), (16, TEXT)]


# --- (f) Flux: the rotary embeddings of the kept tokens are gathered, per sample -----------------------------------


def test_flux_rotary_rows_are_gathered_per_sample():
    """The routed blocks' output equals running each sample alone through stock blocks with the RoPE table Flux's own
    `pos_embed` computes for [txt_ids; img_ids of that sample's kept tokens]."""
    model = make_model("flux").train()
    router = apply_tread(model, [ROUTE], generator=torch.Generator().manual_seed(3))
    blocks = blocks_of(model)
    start, end = ROUTE["start_layer_idx"], ROUTE["end_layer_idx"]
    seen = {}
    blocks[start].register_forward_pre_hook(
        record(seen, "inputs", lambda a, kw: dict(kw)), with_kwargs=True, prepend=True
    )
    blocks[end].register_forward_hook(record(seen, "routed", lambda a, out: out[1]), prepend=True)
    inputs = make_inputs("flux")
    model(**inputs)
    (mask,) = router.route_masks

    router.remove()
    start_inputs = seen["inputs"]
    for b in range(BATCH):
        kept = (~mask[b]).nonzero().squeeze(1)
        rotary = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"][kept]]))
        hidden = start_inputs["hidden_states"][b : b + 1, kept]
        text = start_inputs["encoder_hidden_states"][b : b + 1]
        with torch.no_grad():
            for block in blocks[start : end + 1]:
                text, hidden = block(
                    hidden_states=hidden,
                    encoder_hidden_states=text,
                    temb=start_inputs["temb"][b : b + 1],
                    image_rotary_emb=rotary,
                )
        torch.testing.assert_close(seen["routed"][b : b + 1].detach(), hidden, rtol=1e-5, atol=1e-5)


def test_flux_per_sample_rotary_table_rejects_other_indexing():
    from diffusers_tread.models.families import _PerSampleRows as _PerSampleRotary

    table = _PerSampleRotary(torch.randn(2, 7, 4))
    assert table[None, :, None, :].shape == (2, 7, 1, 4)
    assert table[None, None, :, :].shape == (2, 1, 7, 4)
    assert type(table[None, :, None, :]) is torch.Tensor  # a plain tensor (not a subclass)
    with pytest.raises(TypeError, match="rotary"):
        table[0]


# --- (g) LoRA + routing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_lora_parameters_get_gradients_under_routing(name):
    model = make_model(name).train()
    model.requires_grad_(False)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    if name == "pixart":  # PixArtTransformer2DModel has no PeftAdapterMixin; inject directly
        inject_adapter_in_model(config, model)
    else:
        model.add_adapter(config)
    router = apply_tread(model, [ROUTE])
    loss_of(model(**make_inputs(name))).backward()
    assert router.route_masks is not None
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert params_without_grad(model) == set()  # the trainable parameters are exactly the LoRA ones


# --- (h) gradient checkpointing + routing ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_gradient_checkpointing_replays_the_same_routes(name):
    plain, checkpointed = pair(name)
    plain.train(), checkpointed.train()
    checkpointed.enable_gradient_checkpointing()
    stock_checkpoint_func = checkpointed._gradient_checkpointing_func
    routers = [apply_tread(m, TWO_ROUTES, generator=torch.Generator().manual_seed(5)) for m in (plain, checkpointed)]
    inputs = make_inputs(name)
    outputs = [m(**inputs).sample for m in (plain, checkpointed)]
    for output in outputs:
        output.square().mean().backward()

    assert checkpointed._gradient_checkpointing_func is stock_checkpoint_func  # restored after the forward
    for a, b in zip(*(r.route_masks for r in routers), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(outputs[1], outputs[0])
    grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in (plain, checkpointed)]
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, msg=key)


# --- (i) remove() restores the stock model --------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_remove_leaves_no_hooks_and_the_stock_forward(name):
    model, stock = pair(name)
    model.train(), stock.train()
    hooks_before = hook_counts(model)
    router = apply_tread(model, [ROUTE])
    assert hook_counts(model) > hooks_before
    inputs = make_inputs(name)
    model(**inputs)
    router.remove()
    assert hook_counts(model) == hooks_before
    assert torch.equal(model(**inputs).sample, stock(**inputs).sample)
    apply_tread(model, [ROUTE]).remove()  # can be attached again once removed


def test_save_pretrained_writes_the_stock_model_and_deepcopy_keeps_the_router(tmp_path):
    model = make_model("sd3").train()
    router = apply_tread(model, [ROUTE])
    model.save_pretrained(tmp_path)
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path)  # a plain stock model, in eval mode
    inputs = make_inputs("sd3")
    assert torch.equal(loaded(**inputs).sample, model.eval()(**inputs).sample)
    copied = copy.deepcopy(model.train())  # e.g. an EMA copy: its own router over its own blocks
    copied_router = attached_router(copied)
    assert copied_router is not router and copied_router.transformer is copied
    copied(**inputs)
    assert copied_router.route_masks is not None and router.route_masks is None


def test_paper_routes_and_negative_indices():
    assert apply_tread(make_model("flux")).routes == [
        {"start_layer_idx": 2, "end_layer_idx": 2, "selection_ratio": 0.5}
    ]
    router = TreadRouter(make_model("sd3"), [{"start_layer_idx": -4, "end_layer_idx": -2, "selection_ratio": 0.5}])
    assert router.routes == [{"start_layer_idx": 2, "end_layer_idx": 4, "selection_ratio": 0.5}]


def test_selection_ratio_override_per_route():
    model = make_model("sd3").train()
    router = apply_tread(model, TWO_ROUTES)
    router.selection_ratio = [0.75, 0.0]
    model(**make_inputs("sd3"))
    assert [int(mask[0].sum()) for mask in router.route_masks] == [12, 0]


def test_pixart_image_attention_mask_is_gathered_for_the_kept_tokens():
    model = make_model("pixart").train()
    router = apply_tread(model, [ROUTE])
    received = []
    for block in blocks_of(model):
        block.register_forward_pre_hook(
            lambda m, args, kwargs: received.append(kwargs["attention_mask"]), with_kwargs=True
        )
    inputs = make_inputs("pixart")
    image_mask = torch.rand(BATCH, GRID * GRID) > 0.3
    model(**inputs, attention_mask=image_mask)
    (bypassed,) = router.route_masks
    bias = (1 - image_mask.float()) * -10000.0  # PixArt turns the mask into a key bias (batch, 1, tokens)
    for index, mask in enumerate(received):
        routed = ROUTE["start_layer_idx"] <= index <= ROUTE["end_layer_idx"]
        expected = bias[~bypassed].view(BATCH, -1) if routed else bias
        assert torch.equal(mask.squeeze(1), expected)


# --- (j) clear errors ------------------------------------------------------------------------------------------------


def test_unsupported_models_and_bad_routes_raise_clearly():
    with pytest.raises(TypeError, match="TREAD routing supports PixArtTransformer2DModel"):
        apply_tread(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="TreadTransformer2DModel"):
        apply_tread(TreadTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=4))
    model = make_model("flux")
    with pytest.raises(ValueError, match="outside the model's layers; valid indices are 0..5"):
        apply_tread(model, [{"start_layer_idx": 2, "end_layer_idx": 6, "selection_ratio": 0.5}])
    with pytest.raises(ValueError, match="must not overlap"):
        apply_tread(model, [ROUTE, ROUTE])
    with pytest.raises(ValueError, match="'paper'"):
        apply_tread(model, "dense")
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        apply_tread(model, [{**ROUTE, "selection_ratio": 1.0}])
    router = apply_tread(model, [ROUTE])
    with pytest.raises(ValueError, match="already has a TreadRouter"):
        apply_tread(model, [ROUTE])
    router.selection_ratio = [0.5, 0.5]
    with pytest.raises(ValueError, match="2 values for 1 routes"):
        model.train()(**make_inputs("flux"))
    assert hook_counts(model) > 0 and router._open == {}  # the failed forward left no state behind


@pytest.mark.parametrize(
    "name, extra, match",
    [
        ("sd3", {"block_controlnet_hidden_states": [torch.zeros(BATCH, 16, WIDTH)]}, "ControlNet"),
        ("sd3", {"skip_layers": [4]}, "skip_layers"),
        ("flux", {"controlnet_block_samples": [torch.zeros(BATCH, 16, WIDTH)]}, "ControlNet"),
        ("flux", {"joint_attention_kwargs": {"attention_mask": torch.ones(BATCH, 1, 1, 21)}}, "attention_mask"),
    ],
)
def test_inputs_routing_cannot_honour_raise(name, extra, match):
    model = make_model(name).train()
    apply_tread(model, [ROUTE])
    with pytest.raises(ValueError, match=match):
        model(**make_inputs(name), **extra)
