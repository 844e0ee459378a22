"""REPA (diffusers_tread.repa) with and without routes: the loss, kept-token targets, delayed routing, precomputed
features, exact resume and every refusal. Encoders are tiny random transformers models saved to disk (no download)."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import REPO, TINY, launch, load_script, tiny_inputs, tiny_tread, tiny_vae, transformer_weights
from safetensors.torch import load_file, save_file

from diffusers_tread import TreadDiTPipeline, routing
from diffusers_tread.data import LatentShardDataset, load_digits
from diffusers_tread.repa import RepaEncoder, RepaProjector, default_repa_layer, prepare_repa, repa_loss


def save_tiny_dinov2(path, **overrides):
    """A random 1-layer DINOv2 with 2-pixel patches (a 4x4 DiT grid -> 8x8 px input), width 16."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=2)
    config.update(image_size=8, num_channels=3, **overrides)
    Dinov2Model(Dinov2Config(**config)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


def test_loss_equals_a_hand_written_eq_8():
    generator = torch.Generator().manual_seed(0)
    projected, targets = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 6, 5, generator=generator)
    kept = torch.tensor([[0, 2, 5], [1, 3, 4]])
    total = 0.0
    for b in range(2):
        for n in range(3):
            p, y = projected[b, n].tolist(), targets[b, kept[b, n]].tolist()
            dot = sum(pi * yi for pi, yi in zip(p, y, strict=True))
            total += dot / (sum(v * v for v in p) ** 0.5 * sum(v * v for v in y) ** 0.5)
    assert repa_loss(projected, targets, kept).item() == pytest.approx(-total / 6, abs=1e-6)
    # all tokens: the targets are used as they are
    full = torch.randn(2, 6, 5, generator=generator)
    expected = -torch.nn.functional.cosine_similarity(full, targets, dim=-1).mean()
    torch.testing.assert_close(repa_loss(full, targets), expected)


def _block_inputs(model):
    """Record the token count every block sees."""
    seen = {}
    for idx, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(lambda module, args, out, idx=idx: seen.__setitem__(idx, out))
    return seen


def test_kept_token_alignment_captures_the_routed_rows_and_their_positions():
    model = tiny_tread(routes=[{"start_layer_idx": 1, "end_layer_idx": 4, "selection_ratio": 0.5}]).train()
    seen = _block_inputs(model)
    x, t, y = tiny_inputs(model=model)
    out = model(x, t, y, capture_layer_idx=2, route_generator=torch.Generator().manual_seed(3))
    kept = out.captured_token_indices
    assert out.captured_hidden_states is seen[2] and out.captured_hidden_states.shape[1] == 8
    # the rows are the tokens that did not bypass the route, in ascending position
    expected = torch.stack([(~mask).nonzero().squeeze(1) for mask in out.route_masks[0]])
    assert torch.equal(kept, expected)
    # targets gathered with the same positions: row i of sample b is target token kept[b, i]
    targets = torch.randn(3, 16, 5)
    projected = torch.randn(3, 8, 5)
    by_hand = torch.stack([targets[b, kept[b]] for b in range(3)])
    torch.testing.assert_close(repa_loss(projected, targets, kept), repa_loss(projected, by_hand))
    # a block outside the route: all tokens, no positions
    out = model(x, t, y, capture_layer_idx=0, route_generator=torch.Generator().manual_seed(3))
    assert out.captured_hidden_states.shape[1] == 16 and out.captured_token_indices is None


class TokenMixer(torch.nn.Module):
    """A block whose output depends on the other tokens (as attention's does): which tokens it sees matters."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, hidden_states):
        return self.linear(hidden_states) + hidden_states.mean(dim=1, keepdim=True)


def test_delayed_routing_drops_tokens_only_after_the_aligned_block():
    """Route 1..4 delayed after block 2: blocks 1-2 see all tokens, 3-4 the kept ones, and the bypassed tokens
    re-enter after block 4 with the state they had entering block 1 (checked against the loop written out)."""
    torch.manual_seed(0)
    blocks = [TokenMixer() for _ in range(6)]
    x = torch.randn(2, 10, 4)
    route = [{"start_layer_idx": 1, "end_layer_idx": 4, "selection_ratio": 0.4}]
    seen = {}
    out, masks = routing.run_blocks(
        blocks, x, lambda block, h: block(h), route, generator=torch.Generator().manual_seed(1), drop_after_layer=2,
        on_block_output=lambda idx, h, kept: seen.__setitem__(idx, (h.shape[1], kept)),
    )  # fmt: skip
    kept = routing.sample_kept_indices(2, 10, 0.4, generator=torch.Generator().manual_seed(1))
    h = blocks[0](x)
    pre_route = h
    h = routing.gather_tokens(blocks[2](blocks[1](h)), kept)
    h = routing.scatter_tokens(blocks[4](blocks[3](h)), kept, pre_route)
    torch.testing.assert_close(out, blocks[5](h), rtol=0, atol=0)
    assert [seen[i][0] for i in range(6)] == [10, 10, 10, 6, 6, 10]
    assert seen[2][1] is None and torch.equal(seen[3][1], kept)
    assert torch.equal(masks[0], routing.bypass_mask(kept, 10))
    # in the model: the aligned block 2 runs on all tokens
    model = tiny_tread(routes=[{"start_layer_idx": 1, "end_layer_idx": 4, "selection_ratio": 0.5}]).train()
    inputs = tiny_inputs(model=model)
    output = model(*inputs, capture_layer_idx=2, delay_routing_after=2)
    assert output.captured_hidden_states.shape[1] == 16 and output.captured_token_indices is None


def test_default_layer_and_encoder_grid(dinov2_dir):
    assert default_repa_layer(28) == 7 and default_repa_layer(8) == 1
    encoder = RepaEncoder.from_pretrained(dinov2_dir, token_grid=4)
    assert encoder.image_size == 8 and encoder.feature_dim == 16
    digits = torch.rand(2, 1, 16, 16) * 2 - 1
    features = encoder(digits)  # 1-channel images repeated to 3, resized to 8 px: the 4x4 patch tokens
    assert features.shape == (2, 16, 16)
    x = torch.nn.functional.interpolate((digits.expand(-1, 3, -1, -1) + 1) / 2, size=(8, 8), mode="bicubic")
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(features, encoder.model(pixel_values=x).last_hidden_state[:, 1:])


@pytest.fixture(scope="module")
def repa_latents(tmp_path_factory, accelerate_config, dinov2_dir):
    """16 px digits through the tiny VAE (8x8 latents) with flipped copies and tiny-DINOv2 features on a 4x4 grid."""
    vae_dir = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(vae_dir)
    latents_dir = tmp_path_factory.mktemp("latents")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    extract = [
        "accelerate", "launch", "--config_file", accelerate_config, "--num_processes", "1",
        str(REPO / "training" / "extract_latents.py"), "--use_digits", "--resolution=16", f"--vae={vae_dir}",
        f"--output_dir={latents_dir}", "--batch_size=256", "--shard_size=800", "--flip",
        f"--repa_encoder={dinov2_dir}",
    ]  # fmt: skip
    result = subprocess.run(extract, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return latents_dir


def test_extraction_stores_features_of_both_copies_and_the_dataset_pairs_them(repa_latents, dinov2_dir):
    metadata = json.loads((repa_latents / "metadata.json").read_text())
    assert metadata["repa_encoder"] == dinov2_dir and metadata["repa_token_grid"] == 4
    shard = load_file(repa_latents / metadata["shards"][0]["file"])
    encoder = RepaEncoder.from_pretrained(dinov2_dir, token_grid=4)
    images = torch.stack([load_digits(16, split="train", num_channels=3)[0][i]["pixel_values"] for i in range(3)])
    torch.testing.assert_close(shard["repa_features"][:3], encoder(images), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shard["repa_features_flipped"][:3], encoder(images.flip(-1)), rtol=1e-4, atol=1e-5)
    dataset = LatentShardDataset(str(repa_latents), random_flip=True, seed=0, repa_features=True)
    copies = {}
    for index in range(8):  # each item's features are those of the copy its latents come from
        item = dataset[index]
        flipped = torch.equal(item["latents"], shard["latents_flipped"][index])
        name = "repa_features_flipped" if flipped else "repa_features"
        assert torch.equal(item["repa_features"], shard[name][index])
        copies[flipped] = True
    assert len(copies) == 2


def _checkpoint_projector(out, step):
    return load_file(out / f"checkpoint-{step}" / "repa_projector" / "model.safetensors")


@pytest.mark.parametrize("source", ["online", "precomputed"])
def test_resume_with_repa_is_bit_exact_and_the_pipeline_has_no_projector(
    tmp_path, accelerate_config, dinov2_dir, repa_latents, source
):
    """Online: the encoder runs on the digits, with delayed routing; precomputed: features (and flipped copies) read
    with the latents, kept-token alignment. Interrupted at step 2 and resumed = uninterrupted, bit for bit."""
    if source == "precomputed":
        data = ["--resolution=16", f"--latents_dir={repa_latents}", "--random_flip"]
    else:
        data = ["--repa_delayed_routing"]
    common = [*data, f"--repa_encoder={dinov2_dir}", "--repa_projector_dim=32", "--validation_steps=100",
              "--routes=1:4:0.5", "--repa_layer=2", "--checkpointing_steps=2", "--gradient_accumulation_steps=2"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(accelerate_config, f"--output_dir={straight}", "--max_train_steps=4", *common)
    launch(accelerate_config, f"--output_dir={resumed}", "--max_train_steps=2", *common)
    launch(accelerate_config, f"--output_dir={resumed}", "--max_train_steps=4", "--resume_from_checkpoint=latest",
           *common)  # fmt: skip
    a, b = transformer_weights(straight), transformer_weights(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    a, b = _checkpoint_projector(straight, 4), _checkpoint_projector(resumed, 4)
    assert set(a) and not torch.equal(a["mlp.0.weight"], _checkpoint_projector(straight, 2)["mlp.0.weight"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    # the saved pipeline: no projector file, no projector weight, and it loads
    pipeline_files = [p for p in straight.rglob("*") if not p.relative_to(straight).parts[0].startswith("checkpoint")]
    assert not [p for p in pipeline_files if "repa" in p.name]
    assert not [key for key in transformer_weights(straight) if key.startswith("mlp.")]
    assert TreadDiTPipeline.from_pretrained(straight).transformer.config.routes[0]["end_layer_idx"] == 4
    # resuming a REPA run without REPA is refused, naming the fix
    without_repa = [arg for arg in common if not arg.startswith("--repa")]
    with pytest.raises(ValueError, match=r"its --repa_encoder was \S+; this run has None\. .*resume with the same"):
        load_script().main([*TINY, f"--output_dir={resumed}", "--max_train_steps=6", "--resume_from_checkpoint=latest",
                            *without_repa])  # fmt: skip


def _main(tmp_path, *args):
    load_script().main([*TINY, f"--output_dir={tmp_path / 'out'}", "--max_train_steps=1", *args])


def test_unknown_non_vision_and_unmatchable_encoders_are_refused(tmp_path):
    from transformers import BertConfig, BertModel, SwinConfig, SwinModel

    with pytest.raises(ValueError, match="not a transformers model name or folder"):
        _main(tmp_path, f"--repa_encoder={tmp_path / 'nowhere'}")
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(bert)
    with pytest.raises(ValueError, match="not a vision transformer with square patches"):
        _main(tmp_path, f"--repa_encoder={bert}")
    swin = tmp_path / "swin"  # patch merging: its last hidden state is a 2x2 grid, not the DiT's 4x4
    SwinModel(
        SwinConfig(image_size=8, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2)
    ).save_pretrained(swin)
    with pytest.raises(ValueError, match="not the 4x4 patch grid"):
        _main(tmp_path, f"--repa_encoder={swin}")


def test_layer_outside_the_model_and_delayed_routing_without_a_route_are_refused(tmp_path, dinov2_dir):
    with pytest.raises(ValueError, match="--repa_layer 8 is outside the model's 8 blocks"):
        _main(tmp_path, f"--repa_encoder={dinov2_dir}", "--repa_layer=8")
    with pytest.raises(ValueError, match="needs a route that covers that layer"):
        _main(tmp_path, f"--repa_encoder={dinov2_dir}", "--repa_layer=5", "--routes=2:4:0.5", "--repa_delayed_routing")
    with pytest.raises(ValueError, match="needs a route that covers that layer"):  # at the route's end: nothing after
        _main(tmp_path, f"--repa_encoder={dinov2_dir}", "--repa_layer=4", "--routes=2:4:0.5", "--repa_delayed_routing")
    with pytest.raises(SystemExit):
        _main(tmp_path, "--repa_delayed_routing")  # without an encoder
    with pytest.warns(UserWarning, match="outside every route"):
        prepare_repa(dinov2_dir, 6, [{"start_layer_idx": 2, "end_layer_idx": 4}], 8, 64, token_grid=4)


def test_features_from_another_encoder_grid_or_extraction_are_refused(tmp_path, dinov2_dir, repa_latents):
    latents = ["--resolution=16", f"--latents_dir={repa_latents}"]
    other = save_tiny_dinov2(tmp_path / "other-dinov2")
    with pytest.raises(ValueError, match="holds features of the encoder"):
        _main(tmp_path, *latents, f"--repa_encoder={other}")
    with pytest.raises(ValueError, match="on a 4-wide token grid, but the model's grid is 2"):
        _main(tmp_path, *latents, f"--repa_encoder={dinov2_dir}", f"--model_config={write_config(tmp_path)}")
    # a shard from another extraction (another seed) put into this directory
    mixed = tmp_path / "mixed"
    shutil.copytree(repa_latents, mixed)
    metadata = json.loads((mixed / "metadata.json").read_text())
    shard_path = mixed / metadata["shards"][1]["file"]
    tensors = load_file(shard_path)
    from safetensors import safe_open

    with safe_open(shard_path, framework="pt") as f:
        settings = json.loads(f.metadata()["settings"])
    save_file(tensors, shard_path, metadata={"settings": json.dumps({**settings, "seed": 1})})
    mixed_args = ("--resolution=16", f"--latents_dir={mixed}", f"--repa_encoder={dinov2_dir}")
    with pytest.raises(ValueError, match="changed since extraction"):  # the shard checksums see it first
        _main(tmp_path, *mixed_args)
    with pytest.raises(ValueError, match=r"comes from another extraction .*differ in \['seed'\]"):
        _main(tmp_path, *mixed_args, "--skip_latents_checksum")  # and without them, the shards' settings
    # latents without features
    bare = tmp_path / "bare"
    shutil.copytree(repa_latents, bare)
    metadata = {k: v for k, v in metadata.items() if not k.startswith("repa_")}
    (bare / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="holds no REPA encoder features"):
        _main(tmp_path, "--resolution=16", f"--latents_dir={bare}", f"--repa_encoder={dinov2_dir}")


def write_config(tmp_path):
    """A DiT-Tiny config with patch 4 (a 2x2 grid on 8x8 latents)."""
    path = tmp_path / "patch4.json"
    path.write_text(json.dumps({"num_layers": 8, "num_attention_heads": 4, "attention_head_dim": 16, "patch_size": 4}))
    return str(path)


def test_projector_refuses_a_checkpoint_of_another_shape(tmp_path):
    RepaProjector(8, 16, 32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="resume with the --repa_encoder and --repa_projector_dim"):
        RepaProjector(8, 16, 64).load_pretrained(tmp_path)
