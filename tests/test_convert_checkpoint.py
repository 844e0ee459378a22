"""training/convert_checkpoint.py against an independent forward pass in the original DiT layout."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import load_module, tiny_vae

from diffusers_tread import PRESETS, TreadDiTPipeline

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "convert_checkpoint.py"


convert_checkpoint = load_module(SCRIPT)


# --- a DiT in the original layout (Peebles & Xie 2023, Sec. 3.2 and Fig. 3), written from the paper's description ---


def timestep_features(t: torch.Tensor, freq_shift: int) -> torch.Tensor:
    """256 sinusoidal features [cos | sin] with frequencies 10000^(-k / (128 - freq_shift)), k = 0..127.
    DiT's own embedder has freq_shift 0; Diffusers' DiT embedder has freq_shift 1."""
    k = torch.arange(128, dtype=torch.float32)
    angles = t.float()[:, None] * torch.exp(-math.log(10000) * k / (128 - freq_shift))[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def dit_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """DiT's fixed 2D sin-cos table (MAE's): the first half of the channels encodes a token's column, the second half
    its row, each as [sin | cos] with frequencies 10000^(-i / (dim / 4)); tokens in row-major order."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def one_axis(position: torch.Tensor, channels: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(channels // 2, dtype=torch.float64) / (channels / 2))
        angles = position.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([one_axis(cols, dim // 2), one_axis(rows, dim // 2)], dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)  # no affine parameters


def reference_dit(sd: dict, x, t, y, num_heads: int, freq_shift: int = 0) -> torch.Tensor:
    """Original DiT forward: one shared conditioning c = MLP(t features) + label embedding, adaLN-Zero blocks with a
    fused qkv projection, a modulated final layer, unpatchify."""
    patch = sd["x_embedder.proj.weight"].shape[-1]
    batch, _, height, width = x.shape
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    t_hidden = F.silu(
        F.linear(timestep_features(t, freq_shift), sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])
    )
    c = F.linear(t_hidden, sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = c + sd["y_embedder.embedding_table.weight"][y]

    num_tokens, dim = h.shape[1:]
    head_dim = dim // num_heads
    depth = len({key.split(".")[1] for key in sd if key.startswith("blocks.")})
    for i in range(depth):
        w = {key[len(f"blocks.{i}.") :]: value for key, value in sd.items() if key.startswith(f"blocks.{i}.")}
        modulation = F.linear(F.silu(c), w["adaLN_modulation.1.weight"], w["adaLN_modulation.1.bias"])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        qkv = F.linear(modulate(layer_norm(h), shift_msa, scale_msa), w["attn.qkv.weight"], w["attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, num_tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1) @ v
        attention = attention.transpose(1, 2).reshape(batch, num_tokens, dim)
        h = h + gate_msa[:, None] * F.linear(attention, w["attn.proj.weight"], w["attn.proj.bias"])
        hidden = F.gelu(
            F.linear(modulate(layer_norm(h), shift_mlp, scale_mlp), w["mlp.fc1.weight"], w["mlp.fc1.bias"]),
            approximate="tanh",
        )
        h = h + gate_mlp[:, None] * F.linear(hidden, w["mlp.fc2.weight"], w["mlp.fc2.bias"])

    shift, scale = F.linear(
        F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"]
    ).chunk(2, dim=1)
    h = F.linear(modulate(layer_norm(h), shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    grid_h, grid_w = height // patch, width // patch
    channels = h.shape[-1] // (patch * patch)
    h = h.reshape(batch, grid_h, grid_w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(batch, channels, grid_h * patch, grid_w * patch)


def original_state_dict(
    hidden=32, depth=2, patch=2, in_channels=4, learn_sigma=True, num_classes=10, sample_size=8, seed=0
) -> dict:
    """Random weights in DiT's layout (adaLN layers non-zero, so every path matters)."""
    generator = torch.Generator().manual_seed(seed)

    def linear(prefix, fan_out, fan_in):
        return {
            f"{prefix}.weight": torch.randn(fan_out, fan_in, generator=generator) / math.sqrt(fan_in),
            f"{prefix}.bias": 0.1 * torch.randn(fan_out, generator=generator),
        }

    out_channels = 2 * in_channels if learn_sigma else in_channels
    sd = {
        "x_embedder.proj.weight": torch.randn(hidden, in_channels, patch, patch, generator=generator) / patch,
        "x_embedder.proj.bias": 0.1 * torch.randn(hidden, generator=generator),
        "pos_embed": dit_pos_embed(hidden, sample_size // patch)[None],
        "y_embedder.embedding_table.weight": torch.randn(num_classes + 1, hidden, generator=generator),
        **linear("t_embedder.mlp.0", hidden, 256),
        **linear("t_embedder.mlp.2", hidden, hidden),
        **linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden),
        **linear("final_layer.linear", patch * patch * out_channels, hidden),
    }
    for i in range(depth):
        sd.update(linear(f"blocks.{i}.adaLN_modulation.1", 6 * hidden, hidden))
        sd.update(linear(f"blocks.{i}.attn.qkv", 3 * hidden, hidden))
        sd.update(linear(f"blocks.{i}.attn.proj", hidden, hidden))
        sd.update(linear(f"blocks.{i}.mlp.fc1", 4 * hidden, hidden))
        sd.update(linear(f"blocks.{i}.mlp.fc2", hidden, 4 * hidden))
    return sd


def inputs(sd, batch=3, sample_size=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    in_channels = sd["x_embedder.proj.weight"].shape[1]
    x = torch.randn(batch, in_channels, sample_size, sample_size, generator=generator)
    t = torch.tensor([999, 500, 3])
    y = torch.tensor([0, 9, 10])  # 10: the null class
    return x, t, y


def convert(tmp_path, checkpoint, name="ckpt.pt", **kwargs):
    path = tmp_path / name
    torch.save(checkpoint, path)
    kwargs = {"num_attention_heads": 2, "vae": "none", **kwargs}
    return convert_checkpoint.convert(path, tmp_path / "out", **kwargs)


# --- equivalence ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch, learn_sigma, sample_size, shared_conditioning",
    [(2, True, 8, False), (2, False, 8, False), (4, True, 16, False), (2, True, 8, True)],
    ids=["p2-sigma", "p2", "p4-sigma", "p2-sigma-shared"],
)
def test_converted_model_matches_the_original_layout_forward(
    tmp_path, patch, learn_sigma, sample_size, shared_conditioning
):
    sd = original_state_dict(patch=patch, learn_sigma=learn_sigma, sample_size=sample_size)
    convert(tmp_path, sd, shared_conditioning=shared_conditioning)
    model = TreadDiTPipeline.from_pretrained(tmp_path / "out").transformer  # what was saved
    assert model.config.shared_conditioning == shared_conditioning
    assert not model.training and model.config.out_channels == (8 if learn_sigma else 4)
    assert model.config.norm_eps == 1e-6  # DiT's LayerNorm eps (Diffusers' default 1e-5 would be off by ~3e-6 here)
    x, t, y = inputs(sd, sample_size=sample_size)
    with torch.no_grad():
        converted = model(x, timestep=t, class_labels=y).sample
        # 1. Exact, with Diffusers' timestep frequencies in the reference (the one formula a saved model cannot change)
        torch.testing.assert_close(converted, reference_dit(sd, x, t, y, num_heads=2, freq_shift=1), rtol=0, atol=1e-5)
        # 2. Exact against the original itself once the embedder uses DiT's frequencies
        original = reference_dit(sd, x, t, y, num_heads=2, freq_shift=0)
        convert_checkpoint.use_original_timestep_frequencies(model)
        torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample, original, rtol=0, atol=1e-5)
    # 3. ... and the difference is real (for t in 0..999; see the script's docstring for its size)
    assert (converted - original).abs().max() > 1e-3


def test_embedder_copies_are_independent_tensors(tmp_path):
    sd = original_state_dict()
    model = convert(tmp_path, sd).transformer
    tables = [block.norm1.emb.class_embedder.embedding_table.weight for block in model.transformer_blocks]
    assert all(torch.equal(table, sd["y_embedder.embedding_table.weight"]) for table in tables)
    assert len({table.data_ptr() for table in tables}) == len(tables)  # fine-tuning may let them drift
    assert all(block.norm1.emb.class_embedder.dropout_prob == 0 for block in model.transformer_blocks)


@pytest.mark.parametrize(
    "name, image_size", [("DiT-XL/2", 256), ("DiT-XL/2", 512), ("DiT-S/8", 256), ("DiT-B/4", 512)]
)
def test_infers_every_dit_size_from_shapes(name, image_size):
    preset = PRESETS[name]
    hidden = preset["num_attention_heads"] * preset["attention_head_dim"]
    patch, grid = preset["patch_size"], image_size // 8 // preset["patch_size"]
    shapes = {
        "x_embedder.proj.weight": (hidden, 4, patch, patch),
        "pos_embed": (1, grid * grid, hidden),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "y_embedder.embedding_table.weight": (1001, hidden),
        "final_layer.linear.weight": (patch * patch * 8, hidden),
        **{f"blocks.{i}.mlp.fc1.weight": (4 * hidden, hidden) for i in range(preset["num_layers"])},
    }
    sd = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    config = convert_checkpoint.infer_config(sd)
    assert {key: config[key] for key in preset} == preset
    assert (config["sample_size"], config["out_channels"], config["num_embeds_ada_norm"]) == (image_size // 8, 8, 1000)
    assert convert_checkpoint.architecture_name(config) == name


# --- finding the weights ----------------------------------------------------------------------------------------------


def prefixed(sd, prefix):
    return {prefix + key: value for key, value in sd.items()}


def test_wrappers_and_prefixes():
    ema, raw = original_state_dict(seed=0), original_state_dict(seed=1)
    extract = convert_checkpoint.extract_state_dict
    anchor = "x_embedder.proj.weight"

    def picked(result):
        state_dict, _ = result
        return "ema" if torch.equal(state_dict[anchor], ema[anchor]) else "raw"

    training = {"model": raw, "ema": ema, "opt": {"state": {}}, "args": argparse.Namespace(model="DiT-XL/2")}
    assert picked(extract(training)) == "ema"  # DiT's train.py checkpoint: the EMA by default
    assert picked(extract(training, weights="model")) == "raw"
    assert extract(training)[1] == "ema/*"
    assert picked(extract({"state_dict": prefixed(ema, "module._orig_mod.")})) == "ema"  # DDP + torch.compile
    assert picked(extract({"ema": prefixed(ema, "model.")})) == "ema"  # an EDM preconditioning wrapper
    ema_pytorch = {**prefixed(ema, "ema_model."), **prefixed(raw, "online_model."), "step": torch.tensor(7)}
    assert picked(extract(ema_pytorch)) == "ema"
    assert picked(extract(ema_pytorch, prefix="online_model.")) == "raw"
    with pytest.raises(ValueError, match="pick one with --prefix"):
        extract({**prefixed(ema, "a."), **prefixed(raw, "b.")})
    with pytest.raises(ValueError, match="no such wrapper entry"):
        extract(ema, weights="model")


def test_training_checkpoint_with_args_converts(tmp_path):
    sd = original_state_dict()
    checkpoint = {"model": original_state_dict(seed=5), "ema": sd, "args": argparse.Namespace(lr=1e-4)}
    model = convert(tmp_path, checkpoint).transformer
    assert torch.equal(model.pos_embed.proj.weight, sd["x_embedder.proj.weight"])
    info = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert info["weights"] == "ema/*" and info["architecture"] == "custom" and info["learned_sigma"] is True


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_refuses_arbitrary_pickled_objects(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"ema": original_state_dict(), "payload": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_checkpoint.convert(path, tmp_path / "out", num_attention_heads=2, vae="none")
    assert not marker.exists() and not (tmp_path / "out").exists()

    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: seen.append(kwargs) or real_load(*args, **kwargs))
    torch.save(original_state_dict(), tmp_path / "plain.pt")
    convert_checkpoint.load_checkpoint(tmp_path / "plain.pt")
    assert seen == [{"map_location": "cpu", "weights_only": True}]


def test_unrecognised_state_dicts_raise_clearly(tmp_path):
    sd = original_state_dict()
    with pytest.raises(ValueError, match="Not a DiT/TREAD checkpoint.*keys there: \\['conv1.weight'"):
        convert_checkpoint.extract_state_dict({"conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="Expected a state dict"):
        convert_checkpoint.extract_state_dict(torch.zeros(3))
    with pytest.raises(ValueError, match="lacks `blocks.1.mlp.fc2.bias`"):
        convert_checkpoint.convert_transformer({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}, 2)
    with pytest.raises(ValueError, match=r"Unexpected keys.*blocks.0.attn.q_norm.weight"):
        convert_checkpoint.convert_transformer({**sd, "blocks.0.attn.q_norm.weight": torch.ones(16)}, 2)
    with pytest.raises(ValueError, match="Hidden size 32 is not a DiT size.*--num_attention_heads"):
        convert_checkpoint.convert_transformer(sd)
    with pytest.raises(ValueError, match="pos_embed is not the fixed 2D sin-cos table"):
        convert_checkpoint.convert_transformer({**sd, "pos_embed": torch.randn(1, 16, 32)}, 2)
    with pytest.raises(ValueError, match="pass --sample_size"):
        convert_checkpoint.convert_transformer({k: v for k, v in sd.items() if k != "pos_embed"}, 2)
    model = convert_checkpoint.convert_transformer({k: v for k, v in sd.items() if k != "pos_embed"}, 2, sample_size=8)
    assert model.config.sample_size == 8
    no_adaln = {k: v for k, v in sd.items() if "adaLN" not in k}
    with pytest.raises(ValueError, match="lacks `blocks.0.adaLN_modulation.1.weight`"):
        convert_checkpoint.convert_transformer(no_adaln, 2)


# --- the pipeline folder ----------------------------------------------------------------------------------------------


def test_pipeline_folder_with_local_vae_id2label_routes_and_scheduler(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    (tmp_path / "labels.json").write_text(json.dumps({"id2label": {str(i): f"class {i}" for i in range(10)}}))
    routes = [{"start_layer_idx": 0, "end_layer_idx": 1, "selection_ratio": 0.5}]
    convert(
        tmp_path,
        original_state_dict(sample_size=8),
        vae=str(tmp_path / "vae"),
        id2label=tmp_path / "labels.json",
        routes=json.dumps(routes),
        scheduler="edm",
    )
    pipe = TreadDiTPipeline.from_pretrained(tmp_path / "out")
    assert pipe.vae is not None and type(pipe.scheduler).__name__ == "EDMEulerScheduler"
    assert pipe.transformer.config.routes == routes and pipe.get_label_ids("class 3") == [3]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["class 3"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 16, 16, 3)
    info = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert info["vae_included"] and "at most 0.004" in info["timestep_embedding"]


def test_unloadable_vae_is_an_error_and_nothing_is_written(tmp_path, capsys):
    # A typo in --vae used to save a pipeline without a VAE (exit 0), which returns latents as images.
    with pytest.raises(convert_checkpoint.VAELoadError, match="'someone/not-in-the-offline-cache'.*--vae none"):
        convert(tmp_path, original_state_dict(), vae="someone/not-in-the-offline-cache")
    assert not (tmp_path / "out").exists()
    torch.save(original_state_dict(), tmp_path / "model.pt")
    argv = [f"--checkpoint={tmp_path / 'model.pt'}", f"--output_dir={tmp_path / 'out'}", "--num_attention_heads=2"]
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main([*argv, "--vae=someone/not-in-the-offline-cache"])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    assert "could not load the VAE 'someone/not-in-the-offline-cache'" in capsys.readouterr().err
    # --vae none stays the explicit way to convert without one
    pipe = convert_checkpoint.main([*argv, "--vae=none"])
    info = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert pipe.vae is None and info["vae"] == "none" and info["vae_included"] is False
    assert TreadDiTPipeline.from_pretrained(tmp_path / "out").scheduler.config.clip_sample is False  # DDIM, as DiT


def test_command_line_unloadable_vae_exits_with_a_message(tmp_path):
    torch.save(original_state_dict(), tmp_path / "model.pt")
    missing = tmp_path / "no-such-vae"
    command = [
        sys.executable,
        str(SCRIPT),
        f"--checkpoint={tmp_path / 'model.pt'}",
        f"--output_dir={tmp_path / 'out'}",
        "--num_attention_heads=2",
        f"--vae={missing}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert f"could not load the VAE '{missing}' given by --vae" in result.stderr and "--vae none" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_command_line(tmp_path):
    sd = original_state_dict(depth=8)
    torch.save(sd, tmp_path / "model.pt")
    (tmp_path / "labels.json").write_text(json.dumps([f"name {i}" for i in range(10)]))
    out = tmp_path / "pipe"
    command = [
        sys.executable,
        str(SCRIPT),
        f"--checkpoint={tmp_path / 'model.pt'}",
        f"--output_dir={out}",
        "--num_attention_heads=2",
        "--vae=none",
        "--scheduler=ddpm",
        "--routes=paper",
        f"--id2label={tmp_path / 'labels.json'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "Saved custom (ddpm" in result.stderr and "10000^(-k/127)" in result.stderr
    pipe = TreadDiTPipeline.from_pretrained(out)
    assert pipe.scheduler.config.variance_type == "learned_range"
    assert pipe.transformer.config.routes == [{"start_layer_idx": 2, "end_layer_idx": 4, "selection_ratio": 0.5}]
