"""End-to-end tests of training/train_tread_t2i_lora.py on tiny random PixArt, SD3 and Flux pipelines built here.

Everything is offline: the tokenizers are built from word lists (`tokenizers` BPE/Unigram models), the text encoders,
VAE and transformers are random and tiny, and the image-caption set is drawn in the test (coloured shapes with a
metadata.jsonl). Each pipeline is saved with `save_pretrained`, as a real one would be on disk.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_module
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_tread import hub
from diffusers_tread.t2i_training import load_lora

SCRIPT = REPO / "training" / "train_tread_t2i_lora.py"
WORDS = "a an the red green blue yellow circle square triangle on white black background small big".split()
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


# --- tiny components ------------------------------------------------------------------------------------------------


def t5_tokenizer():
    """A T5 (Unigram) tokenizer over WORDS: `<pad>`=0, `</s>`=1, `<unk>`=2, then one piece per word."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=vocab + [("\u2581", -5.0)], extra_ids=0)


def clip_tokenizer():
    """A CLIP (byte-pair) tokenizer whose merges spell every word of WORDS as one token."""
    from transformers import CLIPTokenizer

    letters = sorted(set("".join(WORDS)))
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    merges = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            if current not in tokens:
                tokens.append(current)
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)


def t5_encoder(seed=0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8)  # fmt: skip
    return T5EncoderModel(config)


def clip_encoder(seed, projection=True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=37,
                            num_attention_heads=2, num_hidden_layers=1, vocab_size=128, projection_dim=16)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_vae(**overrides):
    """3x32x32 images <-> 4x16x16 latents (one 2x downsampling)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, **overrides)  # fmt: skip


def build_pixart(folder):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, num_embeds_ada_norm=1000,
        activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    pipe = PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=tiny_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def build_sd3(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, out_channels=4)  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=clip_encoder(1), tokenizer=clip_tokenizer(), text_encoder_2=clip_encoder(2),
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5_encoder(3), tokenizer_3=t5_tokenizer(),
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def build_flux(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=[4, 4, 8])  # fmt: skip
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=clip_encoder(1, projection=False), tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(2),
        tokenizer_2=t5_tokenizer(),
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def build_captioned_images(folder, count=8):
    """`count` 40x36 images of a coloured shape on white (odd sizes, to exercise resize and crop) + metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
        image = Image.new("RGB", (40, 36), "white")
        draw = ImageDraw.Draw(image)
        box = (8 + index, 6, 30 + index, 28)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        image.save(folder / f"{index}.png")
        lines.append(json.dumps({"file_name": f"{index}.png", "text": f"a {colour} {shape} on white background"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return {
        "pixart": build_pixart(root / "pixart"),
        "sd3": build_sd3(root / "sd3"),
        "flux": build_flux(root / "flux"),
        "images": build_captioned_images(root / "images"),
    }


# --- running the script ---------------------------------------------------------------------------------------------

TINY = [
    "--resolution=32",
    "--train_batch_size=4",
    "--max_sequence_length=16",
    "--report_to=none",
    "--rank=4",
    "--learning_rate=1e-2",
    "--validation_num_inference_steps=2",
    "--num_validation_images=1",
]


def launch(accelerate_config, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = ["accelerate", "launch", "--config_file", accelerate_config, "--num_processes", "1"]
    result = subprocess.run(
        [*command, str(SCRIPT), *TINY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def load_script():
    return load_module(SCRIPT)


def sample(pipe, family, seed=0):
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent",
                  generator=torch.Generator().manual_seed(seed))  # fmt: skip
    if family == "pixart":
        kwargs |= dict(use_resolution_binning=False, max_sequence_length=16)
    elif family == "sd3":
        kwargs |= dict(max_sequence_length=16)
    else:
        kwargs |= dict(max_sequence_length=16, guidance_scale=3.5)
    return pipe("a red circle on white background", **kwargs).images


def transformer_lora(folder):
    return load_file(Path(folder, "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_lora_trains_with_routing_saves_loads_and_samples(tmp_path, accelerate_config, assets, family):
    import diffusers

    out = tmp_path / "out"
    result = launch(
        accelerate_config,
        f"--pretrained_model_name_or_path={assets[family]}",
        f"--train_data_dir={assets['images']}",
        f"--output_dir={out}",
        "--routes=1:2:0.5",
        "--max_train_steps=3",
        "--checkpointing_steps=100",
        "--validation_prompt=a red circle on white background",
        "--validation_steps=2",
        "--random_flip",
        *(["--mixed_precision=bf16"] if family == "sd3" else []),  # CPU autocast, LoRA weights kept in fp32
    )
    logs = result.stdout + result.stderr
    # 32 px -> 16x16 latents -> 64 tokens at patch 2; the route drops floor(64 * 0.5) = 32 of them.
    assert "TREAD routing: route 0 (blocks 1..2): 32 of 64 image tokens bypassed per sample" in logs
    rows = [line.split(",") for line in (out / "loss_history.csv").read_text().splitlines()]
    assert [row[0] for row in rows] == ["1", "2", "3"] and all(row[3] == "0.5000" for row in rows)

    weights = transformer_lora(out)
    assert weights and all(key.startswith("transformer.") and ".lora_" in key for key in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())
    expected = ("to_q", "to_k", "to_v", "to_out.0") + (("add_q_proj", "to_add_out") if family == "sd3" else ())
    assert all(any(f".{name}.lora_A" in key for key in weights) for name in expected)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained away from zero
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.r"] == 4
    assert (out / "validation" / "step_0000002_0.png").exists() and (out / "validation" / "final_0.png").exists()
    card = (out / "README.md").read_text()
    assert "tread" in card and "lora" in card and '"start_layer_idx": 1' in card

    # the saved file loads into the base pipeline and changes its samples; unloading restores them
    index = json.loads((Path(assets[family]) / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(assets[family])
    pipe.set_progress_bar_config(disable=True)
    base = sample(pipe, family)
    load_lora(pipe, str(out))
    adapted = sample(pipe, family)
    assert adapted.shape == base.shape == (1, 4, 16, 16) and torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, base, atol=1e-4)
    if family == "pixart":  # the model card's loading snippet (PEFT, no Diffusers loader for PixArt) does the same
        snippet = card.split("```python\n")[1].split("image = pipe(")[0]
        snippet = snippet.replace(
            'load_file("pytorch_lora_weights.safetensors")', f'load_file("{out}/pytorch_lora_weights.safetensors")'
        )
        namespace = {}
        exec(snippet, namespace)  # noqa: S102
        namespace["pipe"].set_progress_bar_config(disable=True)
        torch.testing.assert_close(sample(namespace["pipe"], family), adapted, rtol=0, atol=0)
    if family == "sd3":  # Diffusers' own LoRA API works on the file as for any SD3 LoRA
        pipe.set_adapters("default_0", 0.0)
        torch.testing.assert_close(sample(pipe, family), base, rtol=1e-5, atol=1e-5)
        pipe.unload_lora_weights()
        torch.testing.assert_close(sample(pipe, family), base, rtol=0, atol=0)
    images = pipe("a blue square", num_inference_steps=2, height=32, width=32, output_type="np",
                  **({"use_resolution_binning": False} if family == "pixart" else {}),
                  max_sequence_length=16).images  # fmt: skip
    assert images.shape == (1, 32, 32, 3)


def run_in_process(*args):
    """main() in this process (no `accelerate launch` start-up): for the runs that only check files and numbers."""
    script = load_script()
    script.main([*TINY, *args])
    return script


def test_flux_trains_with_a_route_across_double_and_single_stream_blocks(tmp_path, assets):
    from diffusers import FluxPipeline

    out = tmp_path / "flux"
    run_in_process(f"--pretrained_model_name_or_path={assets['flux']}", f"--train_data_dir={assets['images']}",
                   f"--output_dir={out}", "--routes=1:2:0.5", "--max_train_steps=2", "--checkpointing_steps=100",
                   "--validation_prompt=a red circle on white background")  # fmt: skip
    rows = [line.split(",") for line in (out / "loss_history.csv").read_text().splitlines()]
    assert [row[3] for row in rows] == ["0.5000", "0.5000"]  # Flux packs 2x2 latents: 64 image tokens, 32 bypass
    assert (out / "validation" / "final_0.png").exists()
    pipe = FluxPipeline.from_pretrained(assets["flux"])
    pipe.set_progress_bar_config(disable=True)
    base = sample(pipe, "flux")
    # Diffusers' own loader; the file is named because 0.35-0.39 look for none in a local folder when offline.
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    assert not torch.allclose(sample(pipe, "flux"), base, atol=1e-4)


def test_precomputed_embeddings_and_exact_resume(tmp_path, assets, monkeypatch):
    """Embeddings written once by --precompute_only are reused (no text encoder is loaded again), and a run resumed
    from a checkpoint ends with exactly the LoRA weights of an uninterrupted run (routing draws included)."""
    common = [f"--pretrained_model_name_or_path={assets['pixart']}", f"--train_data_dir={assets['images']}",
              f"--precomputed_embeddings_dir={tmp_path / 'embeddings'}", "--routes=1:2:0.5", "--cache_latents",
              "--random_flip"]  # fmt: skip
    run_in_process(*common, f"--output_dir={tmp_path / 'unused'}", "--precompute_only")
    info = json.loads((tmp_path / "embeddings" / "embeddings.json").read_text())
    assert info["num_captions"] == 8 and info["max_sequence_length"] == 16
    table = load_file(tmp_path / "embeddings" / "embeddings.safetensors")
    assert table["prompt_embeds"].shape == (8, 16, 32) and table["prompt_attention_mask"].shape == (8, 16)
    assert not (tmp_path / "unused" / "pytorch_lora_weights.safetensors").exists()

    def no_text_encoders(*args, **kwargs):
        raise AssertionError("the text encoders were loaded although the embeddings were precomputed")

    def run(output, *args):
        script = load_script()
        monkeypatch.setattr(script, "compute_embeddings", no_text_encoders)
        script.main([*TINY, *common, f"--output_dir={output}", *args])

    run(tmp_path / "straight", "--max_train_steps=4", "--checkpointing_steps=2")
    run(tmp_path / "resumed", "--max_train_steps=2", "--checkpointing_steps=2")
    assert (tmp_path / "resumed" / "checkpoint-2" / "pytorch_lora_weights.safetensors").exists()
    run(tmp_path / "resumed", "--max_train_steps=4", "--checkpointing_steps=2", "--resume_from_checkpoint=latest")
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    straight, resumed = transformer_lora(tmp_path / "straight"), transformer_lora(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    losses = [line.split(",")[1] for line in (tmp_path / "straight" / "loss_history.csv").read_text().splitlines()]
    resumed_losses = [
        line.split(",")[1] for line in (tmp_path / "resumed" / "loss_history.csv").read_text().splitlines()
    ]
    assert resumed_losses == losses

    # the same library run folder as train_tread.py: resuming the finished run does nothing but say so, and a new run
    # into the used folder is refused unless it asks to clear it
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("*") if p.is_file()}
    run(tmp_path / "resumed", "--max_train_steps=4", "--checkpointing_steps=2", "--resume_from_checkpoint=latest")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("*") if p.is_file()} == before
    assert json.loads((tmp_path / "resumed" / "training_complete.json").read_text()) == {"step": 4}
    script, used = load_script(), [*TINY, *common, f"--output_dir={tmp_path / 'resumed'}"]
    with pytest.raises(SystemExit):
        script.parse_args(used)
    assert script.parse_args([*used, "--overwrite_output_dir"]).overwrite_output_dir

    # embeddings of other captions or another sequence length are refused, not silently reused
    with pytest.raises(ValueError, match="max_sequence_length"):
        run(tmp_path / "other", "--max_train_steps=1", "--max_sequence_length=8")


def test_dense_training_with_routes_none(tmp_path, assets, caplog):
    out = tmp_path / "dense"
    run_in_process(f"--pretrained_model_name_or_path={assets['sd3']}", f"--train_data_dir={assets['images']}",
                   f"--output_dir={out}", "--routes=none", "--max_train_steps=1", "--weighting_scheme=logit_normal")  # fmt: skip
    row = (out / "loss_history.csv").read_text().splitlines()[0].split(",")
    assert row[3] == "" and "TREAD routing:" not in caplog.text
    assert transformer_lora(out)


def test_push_to_hub_from_a_hub_base_model(tmp_path, assets, fake_hub, monkeypatch):
    """The base pipeline comes from a (simulated) Hub repo; the output folder is uploaded, without the token."""
    fake_hub.add("org/tiny-sd3", assets["sd3"])
    script = load_script()
    calls = []
    monkeypatch.setattr(hub.uploads, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw))
                        or type("Repo", (), {"repo_id": f"user/{repo_id}"})())  # fmt: skip
    monkeypatch.setattr(hub.uploads, "upload_folder", lambda **kw: calls.append(("upload", kw["folder_path"], kw)))
    token = "hf_FAKEtoken1234567890abcdefghij"
    out = tmp_path / "sd3-lora"
    script.main([*TINY, "--pretrained_model_name_or_path=org/tiny-sd3", f"--train_data_dir={assets['images']}",
                 f"--output_dir={out}", "--max_train_steps=1", "--routes=1:2:0.5", "--push_to_hub",
                 f"--hub_token={token}", "--validation_prompt=a blue square"])  # fmt: skip
    assert ("snapshot_download", "org/tiny-sd3") in fake_hub.calls
    assert calls[0][:2] == ("create", "sd3-lora") and calls[0][2]["token"] == token
    upload = calls[-1]
    assert upload[0] == "upload" and upload[1] == str(out) and upload[2]["repo_id"] == "user/sd3-lora"
    assert "checkpoint-*" in upload[2]["ignore_patterns"]
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny-sd3" in card and 'pipe.load_lora_weights("user/sd3-lora")' in card
    assert "<redacted>" in card
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_bad_inputs_fail_with_clear_messages(tmp_path, assets):
    script = load_script()
    base = [*TINY, f"--output_dir={tmp_path / 'out'}", "--max_train_steps=1", "--routes=1:2:0.5"]
    data = f"--train_data_dir={assets['images']}"
    # a pipeline whose transformer this script does not know
    other = tmp_path / "dit"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                        "transformer": ["diffusers", "DiTTransformer2DModel"]}))  # fmt: skip
    with pytest.raises(ValueError, match=r"'DiTTransformer2DModel'.*supports PixArtTransformer2DModel"):
        script.main([*base, f"--pretrained_model_name_or_path={other}", data])
    with pytest.raises(ValueError, match="not a Diffusers pipeline"):
        script.main([*base, f"--pretrained_model_name_or_path={tmp_path}", data])
    # captions missing
    with pytest.raises(ValueError, match=r"no column 'caption'.*metadata.jsonl"):
        script.main([*base, f"--pretrained_model_name_or_path={assets['pixart']}", data, "--caption_column=caption"])
    # routes: a malformed shorthand (argparse exits), and routes outside the model's 4 blocks
    with pytest.raises(SystemExit):
        script.main([*base, f"--pretrained_model_name_or_path={assets['pixart']}", data, "--routes=1-2-0.5"])
    with pytest.raises(ValueError, match=r"--routes paper \(blocks 2..0, .*e.g. --routes 1:2:0.5"):
        script.main([*base, f"--pretrained_model_name_or_path={assets['pixart']}", data, "--routes=paper"])
    with pytest.raises(ValueError, match="outside the model's layers"):
        script.main([*base, f"--pretrained_model_name_or_path={assets['pixart']}", data, "--routes=1:7:0.5"])
    with pytest.raises(ValueError, match="not found in the base model"):  # PEFT's own message
        script.main([*base, f"--pretrained_model_name_or_path={assets['pixart']}", data,
                     "--lora_target_modules=not_a_layer", "--routes=none"])  # fmt: skip


def test_unreadable_images_stop_naming_the_file_or_are_skipped_and_counted(tmp_path, assets, caplog, capsys):
    """The same --bad_images as train_tread.py (one implementation in diffusers_tread.data)."""
    folder = tmp_path / "images"
    shutil.copytree(assets["images"], folder)
    (folder / "3.png").write_bytes(b"this is not a png")
    base = [f"--pretrained_model_name_or_path={assets['pixart']}", f"--train_data_dir={folder}", "--routes=1:2:0.5",
            "--max_train_steps=2", "--checkpointing_steps=100"]  # fmt: skip
    with pytest.raises(ValueError, match=r"Could not read the image of item \d \(.*3\.png\).*--bad_images skip"):
        run_in_process(*base, f"--output_dir={tmp_path / 'stop'}")
    for name, extra in (("skip", []), ("cached", ["--cache_latents"])):
        caplog.clear()
        run_in_process(*base, f"--output_dir={tmp_path / name}", "--bad_images=skip", *extra)
        assert f"Skipped 1 unreadable images of the image folder '{folder}'" in caplog.text, name
        assert len((tmp_path / name / "loss_history.csv").read_text().splitlines()) == 2 and transformer_lora(
            tmp_path / name
        )
    with pytest.raises(SystemExit):
        load_script().parse_args(["--pretrained_model_name_or_path=m", "--train_data_dir=d", "--bad_images=ignore"])
    assert "argument --bad_images: invalid choice: 'ignore'" in capsys.readouterr().err


def test_zero_intervals_and_abbreviated_options_are_refused(capsys):
    script = load_script()
    base = ["--pretrained_model_name_or_path=org/model", "--train_data_dir=images"]
    for option in ("--checkpointing_steps=0", "--validation_steps=0", "--validation_epochs=0"):
        with pytest.raises(SystemExit):
            script.parse_args([*base, option])
        assert "must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an abbreviation of --hub_token would escape the token's redaction
        script.parse_args([*base, "--hub_tok", "hf_secret"])
    assert "unrecognized arguments: --hub_tok" in capsys.readouterr().err


# --- issue #21: the run folder's lock, checkpoints that hold what they need, resumes with changed settings ----------


def test_a_folder_in_use_by_another_run_is_refused_naming_it(tmp_path, assets):
    """The library's run-folder lock (taken in `start_run`) guards this script too: a second run into a folder that
    a running job holds is refused before it writes anything, naming the holder."""
    import sys

    out = tmp_path / "out"
    code = "import sys, time\nfrom diffusers_tread.checkpointing import lock_run_folder\n" \
        "lock_run_folder(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(120)\n"  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(OSError, match=rf"in use by another training run \(process {holder.pid} on "):
            load_script().main([*TINY, f"--pretrained_model_name_or_path={assets['pixart']}",
                                f"--train_data_dir={assets['images']}", f"--output_dir={out}", "--max_train_steps=1",
                                "--resume_from_checkpoint=latest"])  # fmt: skip
        assert sorted(p.name for p in out.iterdir()) == [".tread-run.lock", ".tread-run.lock.json"]
    finally:
        holder.kill()
        holder.wait()


def test_resume_refuses_breaking_changes_sets_aside_newer_checkpoints_and_reads_a_torn_history(
    tmp_path, assets, caplog
):
    """The library's resume checks hold for this script: another --rank or global batch is refused in one line naming
    old and new value (before anything loads); an explicit older checkpoint moves the newer one aside; a torn
    loss_history.csv is cut with a warning; a changed learning rate is logged and recorded in the card."""
    from diffusers_tread.checkpointing import find_checkpoint

    out = tmp_path / "out"
    common = [*TINY, f"--pretrained_model_name_or_path={assets['pixart']}", f"--train_data_dir={assets['images']}",
              f"--output_dir={out}", "--routes=1:2:0.5", "--checkpointing_steps=1"]  # fmt: skip
    run_in_process(*common, "--max_train_steps=2")
    resume = [*common, "--max_train_steps=3", "--resume_from_checkpoint=latest"]
    with pytest.raises(ValueError, match=r"its --lora_rank was 4; this run has 8\. ") as error:
        run_in_process(*resume, "--rank=8")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"its global batch .* was 4; this run has 2\. "):
        run_in_process(*resume, "--train_batch_size=2")
    with (out / "loss_history.csv").open("ab") as f:
        f.write(b"3,0.1" + b"\0" * 100)  # a power loss mid-row
    caplog.set_level("WARNING")
    run_in_process(*common, "--max_train_steps=2", "--resume_from_checkpoint=checkpoint-1", "--learning_rate=5e-3")
    assert "dropped 1 torn or unreadable line(s)" in caplog.text and "--learning_rate 0.01 -> 0.005" in caplog.text
    (aside,) = (out / "abandoned").iterdir()
    assert sorted(p.name for p in aside.glob("checkpoint-*")) == ["checkpoint-2"]
    assert find_checkpoint(out, "latest") == str(out / "checkpoint-2")  # the new run's
    assert "resumed with a changed setting: step 1: --learning_rate 0.01 -> 0.005" in (out / "README.md").read_text()
    assert [line.split(",")[0] for line in (out / "loss_history.csv").read_text().splitlines()] == ["1", "2"]
