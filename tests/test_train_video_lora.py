"""End-to-end tests of training/train_tread_t2i_lora.py on tiny random text-to-video pipelines (Wan 2.1, LTX-Video)
built here, and of the clip reader (diffusers_tread.data.videos).

Offline, as tests/test_train_t2i_lora.py: the T5 tokenizer is built from a word list, the text encoder, VAEs and
transformers are random and tiny, and the clips (mp4, webm, gif: a coloured square moving across white frames) are
written in the test with imageio-ffmpeg, whose wheel ships FFmpeg.
"""

import json
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from conftest import REPO, free_port, load_module
from PIL import Image
from safetensors.torch import load_file
from test_train_t2i_lora import COLOURS, t5_encoder, t5_tokenizer

from diffusers_tread.data import CaptionedVideoDataset, load_captioned_videos, read_video

SCRIPT = REPO / "training" / "train_tread_t2i_lora.py"
TINY = [
    "--resolution=32",
    "--train_batch_size=2",
    "--max_sequence_length=16",
    "--report_to=none",
    "--lora_rank=4",
    "--learning_rate=1e-2",
    "--validation_num_inference_steps=2",
    "--num_validation_images=1",
]


# --- tiny components ------------------------------------------------------------------------------------------------


def build_wan(folder, skyreels=False):
    """Wan 2.1 text-to-video: 3x(1+4k)x32x32 clips <-> 4x(1+k)x4x4 latents (4x temporal, 8x spatial), 2x2 patches;
    with ``skyreels``, SkyReels-V2's text-to-video pipeline around the same parts."""
    import diffusers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.1, 0.2, 0.0],
                           latents_std=[2.0, 1.5, 1.0, 0.5])  # fmt: skip
    transformer_class = diffusers.SkyReelsV2Transformer3DModel if skyreels else diffusers.WanTransformer3DModel
    transformer = transformer_class(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)  # fmt: skip
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe_class = diffusers.SkyReelsV2Pipeline if skyreels else diffusers.WanPipeline
    pipe = pipe_class(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=vae, transformer=transformer,
                      scheduler=scheduler)  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def build_ltx(folder):
    """LTX-Video: 3x(1+4k)x32x32 clips <-> 8x(1+k)x8x8 latents (a tiny VAE: 4x temporal, 4x spatial), packed."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=4, caption_channels=32)  # fmt: skip
    # LTX-Video's own scheduler settings: the shift follows the token count
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096)  # fmt: skip
    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=t5_encoder(), tokenizer=t5_tokenizer(),
                       transformer=transformer)  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def clip_frames(index, num_frames, size=(40, 36)):
    """A coloured square moving right, one pixel per frame, on white: uint8 (F, H, W, 3)."""
    colour = list(COLOURS.values())[index % len(COLOURS)]
    frames = np.full((num_frames, size[1], size[0], 3), 255, dtype=np.uint8)
    for frame in range(num_frames):
        left = 4 + index + frame
        frames[frame, 8:24, left : left + 16] = colour
    return frames


def write_clip(path, frames, fps=8):
    """mp4 (H.264), webm (VP9) or gif, by the file's suffix."""
    path = Path(path)
    if path.suffix == ".gif":
        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)
        return path
    codec = {".mp4": "libx264", ".webm": "libvpx-vp9"}[path.suffix]
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec=codec, macro_block_size=1,
                                         output_params=["-crf", "0"] if codec == "libx264" else None)  # fmt: skip
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def build_clips(folder, count=4, num_frames=9):
    """``count`` clips (mp4, webm, gif in turn) of ``num_frames`` frames, captioned in a metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        name = f"clip{index}.{('mp4', 'webm', 'gif')[index % 3]}"
        write_clip(folder / name, clip_frames(index, num_frames))
        colour = list(COLOURS)[index % len(COLOURS)]
        lines.append(json.dumps({"file_name": name, "text": f"a {colour} square on white background"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2v")
    return {"wan": build_wan(root / "wan"), "ltx": build_ltx(root / "ltx"), "clips": build_clips(root / "clips"),
            "skyreels_v2": build_wan(root / "skyreels_v2", skyreels=True)}  # fmt: skip


def run(*args, monkeypatch=None, patches=()):
    script = load_module(SCRIPT)
    for name, value in patches:
        monkeypatch.setattr(script, name, value)
    script.main([*TINY, *args])
    return script


def lora(folder):
    return load_file(Path(folder, "pytorch_lora_weights.safetensors"))


def losses(folder):
    return [line.split(",")[1] for line in Path(folder, "loss_history.csv").read_text().splitlines()]


# --- the clip reader ------------------------------------------------------------------------------------------------


def test_clips_decode_to_fixed_length_crops_drawn_from_the_item_seed(assets):
    files, captions, source = load_captioned_videos(str(assets["clips"]))
    assert [f.suffix for f in files] == [".mp4", ".webm", ".gif", ".mp4"] and captions[0].startswith("a red square")
    dataset = CaptionedVideoDataset(files, list(range(4)), num_frames=5, resolution=32, random_flip=True, seed=3)
    for index in range(4):
        item = dataset[index]
        assert item["pixel_values"].shape == (3, 5, 32, 32) and item["pixel_values"].dtype == torch.float32
        assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
        torch.testing.assert_close(dataset[index]["pixel_values"], item["pixel_values"], rtol=0, atol=0)
    # the gif is lossless: the decoded frames are the written ones (resized 40x36 -> 35x32, then cropped)
    center = read_video(files[2], num_frames=9, resolution=32, center_crop=True)
    frames = clip_frames(2, 9)
    expected = np.asarray(Image.fromarray(frames[4]).resize((35, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    expected = torch.from_numpy(expected[:, 2:34].transpose(2, 0, 1) / 127.5 - 1.0)
    torch.testing.assert_close(center[:, 4], expected, rtol=0, atol=1e-6)
    # another epoch draws other windows/crops for some item; the same (seed, epoch, item) always the same ones
    draws = {epoch: [] for epoch in (0, 1)}
    for epoch in draws:
        dataset.set_epoch(epoch)
        draws[epoch] = [dataset[i]["pixel_values"] for i in range(4)]
    assert any(not torch.equal(a, b) for a, b in zip(draws[0], draws[1], strict=True))
    # a clip shorter than num_frames is named
    with pytest.raises(ValueError, match=r"item 0 \(.*clip0\.mp4\): it has 9 frames, fewer than --num_frames 13"):
        CaptionedVideoDataset(files, [0] * 4, num_frames=13, resolution=32)[0]


def test_metadata_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        load_captioned_videos(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.mp4", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"line 1: .*a\.mp4 does not exist"):
        load_captioned_videos(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.txt", "text": "x"}\n')
    with pytest.raises(ValueError, match="neither a clip"):
        load_captioned_videos(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.mp4"}\n')
    with pytest.raises(ValueError, match=r"no 'text' \(--caption_column\)"):
        load_captioned_videos(str(tmp_path))


# --- training -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["wan", "ltx", "skyreels_v2"])
def test_video_lora_trains_checkpoints_and_resumes_exactly(tmp_path, assets, family, caplog):
    """3 routed steps straight, and 2 steps + a resume from checkpoint-2 to 3, end with the same LoRA weights and
    losses (clip windows, crops, flips, VAE samples, noise, timesteps and routed subsets included); the straight run's
    validation videos are mp4 files, the card shows the routes and how to load the adapters, and the saved file
    changes the base pipeline's videos."""
    import diffusers
    from diffusers.utils import export_to_video  # noqa: F401 (the card's snippet uses it)

    common = [f"--pretrained_model_name_or_path={assets[family]}", f"--train_data_dir={assets['clips']}",
              "--num_frames=5", "--routes=1:2:0.5", "--random_flip", "--checkpointing_steps=2",
              *(["--cache_latents"] if family == "ltx" else [])]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(*common, f"--output_dir={straight}", "--max_train_steps=3",
        "--validation_prompt=a red square on white background", "--validation_steps=2")  # fmt: skip
    run(*common, f"--output_dir={resumed}", "--max_train_steps=2")
    run(*common, f"--output_dir={resumed}", "--max_train_steps=3", "--resume_from_checkpoint=latest")
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys() and any(".attn1.to_q.lora_A" in key for key in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 3
    # 5 frames -> 2 latent frames; Wan: 4x4 latents in 2x2 patches, 8 tokens; LTX: 8x8 latents, 1x1 patches, 128
    tokens = {"wan": 8, "skyreels_v2": 8, "ltx": 128}[family]
    assert f"route 0 (blocks 1..2): {tokens // 2} of {tokens} image tokens bypassed per sample" in caplog.text
    rows = [line.split(",") for line in (straight / "loss_history.csv").read_text().splitlines()]
    assert [row[3] for row in rows] == ["0.5000"] * 3
    assert (straight / "validation" / "step_0000002_0.mp4").is_file()
    video = list(imageio_ffmpeg.read_frames(str(straight / "validation" / "final_0.mp4")))
    assert len(video) - 1 == 5  # the metadata, then 5 frames
    card = (straight / "README.md").read_text()
    assert "export_to_video(video" in card and "velocity target, 5-frame clips" in card
    assert (
        '"start_layer_idx": 1' in card
        and f"pipe = {json.loads((Path(assets[family]) / 'model_index.json').read_text())['_class_name']}.from_pretrained"
        in card
    )

    pipe_class = getattr(diffusers, json.loads((Path(assets[family]) / "model_index.json").read_text())["_class_name"])
    pipe = pipe_class.from_pretrained(assets[family])
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a red square", num_frames=5, height=32, width=32, num_inference_steps=2, output_type="latent",
                    max_sequence_length=16, generator=torch.Generator().manual_seed(0)).frames  # fmt: skip

    base = sample()
    pipe.load_lora_weights(straight)
    adapted = sample()
    assert adapted.shape == base.shape and torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, base, atol=1e-4)


def test_one_frame_clips_and_images_train_a_video_model(tmp_path, assets):
    """--num_frames 1: a one-frame clip (a still gif), images and windows of longer clips train Wan, routed (one
    latent frame: 4 tokens, 2 bypass)."""
    folder = tmp_path / "mixed"
    build_clips(folder, count=2, num_frames=3)
    write_clip(folder / "still.gif", clip_frames(2, 1))
    Image.fromarray(clip_frames(3, 1)[0]).save(folder / "image.png")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines += [json.dumps({"file_name": "still.gif", "text": "a blue square"}),
              json.dumps({"file_name": "image.png", "text": "a yellow square"})]  # fmt: skip
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert read_video(folder / "still.gif", 1, 32).shape == (3, 1, 32, 32)
    out = tmp_path / "out"
    run(f"--pretrained_model_name_or_path={assets['wan']}", f"--train_data_dir={folder}", "--num_frames=1",
        "--routes=1:2:0.5", f"--output_dir={out}", "--max_train_steps=2", "--checkpointing_steps=100",
        "--validation_prompt=a red square", "--report_to=tensorboard")  # fmt: skip
    assert len(losses(out)) == 2 and lora(out)
    rows = [line.split(",") for line in (out / "loss_history.csv").read_text().splitlines()]
    assert [row[3] for row in rows] == ["0.5000"] * 2
    assert len(list(imageio_ffmpeg.read_frames(str(out / "validation" / "final_0.mp4")))) - 1 == 1
    # the final validation video reached TensorBoard (as its frames), beside the loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "train_tread_t2i_lora"), size_guidance={"images": 0}).Reload()
    assert "test/video_0" in events.Tags()["images"] and "loss" in events.Tags()["scalars"]


def test_unreadable_clips_stop_naming_the_file_or_are_skipped(tmp_path, assets, caplog):
    folder = tmp_path / "clips"
    build_clips(folder, count=4, num_frames=5)
    (folder / "clip1.webm").write_bytes(b"this is not a video")
    base = [f"--pretrained_model_name_or_path={assets['wan']}", f"--train_data_dir={folder}", "--num_frames=5",
            "--routes=none", "--max_train_steps=2", "--checkpointing_steps=100"]  # fmt: skip
    with pytest.raises(ValueError, match=r"Could not read the clip of item 1 \(.*clip1\.webm\).*--bad_images skip"):
        run(*base, f"--output_dir={tmp_path / 'stop'}")
    for name, extra in (("skip", []), ("cached", ["--cache_latents"])):
        caplog.clear()
        run(*base, f"--output_dir={tmp_path / name}", "--bad_images=skip", *extra)
        assert len(losses(tmp_path / name)) == 2, name
        if name == "cached":
            assert f"Skipped 1 unreadable clips of the video folder '{folder}'" in caplog.text


def test_video_options_are_checked_against_the_model(tmp_path, assets):
    base = [*TINY, f"--output_dir={tmp_path / 'out'}", "--max_train_steps=1", "--routes=none"]
    script = load_module(SCRIPT)
    with pytest.raises(ValueError, match=r"--num_frames 4 does not fit .*1 \+ 4k frames: use 1 or 5"):
        script.main([*base, f"--pretrained_model_name_or_path={assets['wan']}",
                     f"--train_data_dir={assets['clips']}", "--num_frames=4"])  # fmt: skip
    with pytest.raises(ValueError, match="pass --train_data_dir"):
        script.main([*base, f"--pretrained_model_name_or_path={assets['wan']}", "--dataset_name=org/clips"])
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline",
                                                      "transformer": ["diffusers", "WanTransformer3DModel"]}))  # fmt: skip
    with pytest.raises(ValueError, match="WanImageToVideoPipeline is not a text-to-video pipeline"):
        script.main([*base, f"--pretrained_model_name_or_path={i2v}", f"--train_data_dir={assets['clips']}"])
    experts = tmp_path / "a14b"
    experts.mkdir()
    (experts / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                          "transformer": ["diffusers", "WanTransformer3DModel"],
                                                          "transformer_2": ["diffusers", "WanTransformer3DModel"]}))  # fmt: skip
    with pytest.raises(ValueError, match="two-expert pipeline"):
        script.main([*base, f"--pretrained_model_name_or_path={experts}", f"--train_data_dir={assets['clips']}"])


def test_ltx_training_shift_follows_its_token_count(assets):
    from diffusers_tread.t2i_training import resolve_model, training_flow_shift

    spec = resolve_model(str(assets["ltx"]))
    config = json.loads((Path(assets["ltx"]) / "scheduler" / "scheduler_config.json").read_text())
    assert training_flow_shift(spec, config, 1024) == pytest.approx(np.exp(0.95))
    assert training_flow_shift(spec, config, 4096) == pytest.approx(np.exp(2.05))
    wan = resolve_model(str(assets["wan"]))
    wan_config = json.loads((Path(assets["wan"]) / "scheduler" / "scheduler_config.json").read_text())
    assert training_flow_shift(wan, wan_config, 1024) == 3.0


def test_the_loss_is_read_back_and_stop_signals_checked_only_at_sync_steps(tmp_path, assets, monkeypatch):
    """--logging_steps 2 over 3 steps: the device-side log is flushed (and a stop looked for) at steps 2 and 3 (the
    last, which checkpoints), never at step 1: no host synchronisation in between."""
    script = load_module(SCRIPT)
    flushed, checked = [], []
    flush = script.PendingLog.flush

    def recording_flush(self, gather=None):
        rows = flush(self, gather)
        flushed.append([row[0] for row in rows])
        return rows

    def recording_stop(accelerator, stop):
        checked.append(len(flushed))
        return False

    monkeypatch.setattr(script.PendingLog, "flush", recording_flush)
    monkeypatch.setattr(script, "stop_requested", recording_stop)
    script.main([*TINY, f"--pretrained_model_name_or_path={assets['wan']}", f"--train_data_dir={assets['clips']}",
                 "--num_frames=1", "--routes=none", f"--output_dir={tmp_path / 'out'}", "--max_train_steps=3",
                 "--logging_steps=2", "--checkpointing_steps=100"])  # fmt: skip
    assert flushed == [[1, 2], [3], []] and checked == [0, 1]
    assert [row.split(",")[0] for row in (tmp_path / "out" / "loss_history.csv").read_text().splitlines()] == [
        "1", "2", "3"
    ]  # fmt: skip


def test_lora_rank_is_the_option_and_rank_its_alias():
    """One name with train_tread.py (--lora_rank); Diffusers' examples' --rank still works."""
    script = load_module(SCRIPT)
    base = ["--pretrained_model_name_or_path=org/model", "--train_data_dir=clips"]
    assert script.parse_args([*base, "--lora_rank=8"]).lora_rank == 8
    assert script.parse_args([*base, "--rank=16"]).lora_rank == 16
    assert script.parse_args(base).lora_rank == 4


def test_stages_take_the_run_state_and_a_few_arguments():
    """The stages share one `RunState` (the script's `LoraRun`) instead of a dozen positional arguments each."""
    import inspect

    from diffusers_tread.training_utils import RunState

    script = load_module(SCRIPT)
    assert issubclass(script.LoraRun, RunState)
    stages = {
        name: fn for name, fn in vars(script).items() if inspect.isfunction(fn) and fn.__module__ == script.__name__
    }
    for name, fn in stages.items():
        assert len(inspect.signature(fn).parameters) <= 5, name
    for name in ("text_embeddings", "build_dataset", "batch_loss", "final_validation", "save_model_card"):
        assert next(iter(inspect.signature(stages[name]).parameters)) == "run", name


def test_a_non_finite_loss_stops_at_the_next_sync_step_before_any_checkpoint(tmp_path, assets, monkeypatch):
    """The loss is checked where it is read back: a NaN at step 3 stops the run at step 4 (--logging_steps 2) naming
    step 3, and the checkpoint of step 4 is never written (the flush comes first)."""
    script = load_module(SCRIPT)
    calls = []
    loss = script.loss_from_draws

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        value = loss(*args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(script, "loss_from_draws", nan_at_step_3)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"Loss is nan at step 3\..*untouched.*--learning_rate"):
        script.main([*TINY, f"--pretrained_model_name_or_path={assets['wan']}", f"--train_data_dir={assets['clips']}",
                     "--num_frames=1", "--routes=none", f"--output_dir={out}", "--max_train_steps=6",
                     "--logging_steps=2", "--checkpointing_steps=2"])  # fmt: skip
    assert len(calls) == 4 and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_skyreels_without_ftfy_is_refused_with_the_fix(assets, monkeypatch):
    import importlib.util

    from diffusers_tread.t2i_training import resolve_model

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ftfy" else find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install ftfy"):
        resolve_model(str(assets["skyreels_v2"]))
    assert resolve_model(str(assets["wan"])).family == "wan"  # Wan's pipeline works without it


def test_two_processes_agree_on_the_sync_steps(tmp_path, assets, accelerate_config):
    """Under `accelerate launch` with 2 processes the flushes (a gather) and stop checks (an all-reduce) run at the
    same steps on both, validation only on the main one: the run ends, with every step's loss averaged over both."""
    import os
    import subprocess

    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = ["accelerate", "launch", "--config_file", accelerate_config, "--num_processes", "2",
               f"--main_process_port={free_port()}", str(SCRIPT), *TINY,
               f"--pretrained_model_name_or_path={assets['wan']}", f"--train_data_dir={assets['clips']}",
               "--num_frames=1", "--routes=1:2:0.5", f"--output_dir={out}", "--max_train_steps=3", "--logging_steps=5",
               "--checkpointing_steps=100", "--validation_prompt=a red square", "--validation_steps=2"]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert len(losses(out)) == 3 and lora(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (out / "validation" / "step_0000002_0.mp4").is_file()  # step 2 synced for validation (on both processes)
