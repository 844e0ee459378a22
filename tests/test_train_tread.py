"""End-to-end tests of training/train_tread.py: `accelerate launch` on tiny settings, as Diffusers tests its examples."""

import argparse
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, launch, load_script, tiny_vae, transformer_weights
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from diffusers_tread import TreadDiTPipeline, hub
from diffusers_tread.training_utils import (
    RunState,
    make_lr_scheduler,
    parse_routes,
    scheduled_selection_ratios,
    train_steps_for,
)


@pytest.mark.parametrize(
    "objective, tread_loss, scheduler_class",
    [
        ("flow", "plain", "FlowMatchEulerDiscreteScheduler"),
        ("ddpm", "adapted", "DDPMScheduler"),
        ("edm", "adapted", "EDMEulerScheduler"),
    ],
)
def test_each_objective_trains_and_saves_a_loadable_pipeline(
    tmp_path, accelerate_config, objective, tread_loss, scheduler_class
):
    out = tmp_path / "out"
    launch(
        accelerate_config,
        f"--output_dir={out}",
        f"--objective={objective}",
        f"--tread_loss={tread_loss}",
        "--max_train_steps=3",
        "--checkpointing_steps=100",
        "--validation_steps=100",
        f"--mixed_precision={'bf16' if objective == 'edm' else 'no'}",  # CPU autocast in bf16 too
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_tread", "TreadTransformer2DModel"]
    assert index["scheduler"][1] == scheduler_class
    assert index["id2label"]["7"] == "7"
    pipe = TreadDiTPipeline.from_pretrained(out)
    assert pipe.transformer.config.routes == [{"start_layer_idx": 2, "end_layer_idx": 4, "selection_ratio": 0.5}]
    assert pipe.transformer.config.out_channels == (2 if objective == "ddpm" else 1)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([3, "7"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    assert (out / "samples" / "final_grid.png").exists() and (out / "samples" / "loss.png").exists()
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and "tread" in card.data.tags
    assert f'"name": "{objective}"' in card.text and tread_loss in card.text


def test_checkpoints_pruning_validation_and_ema(tmp_path, accelerate_config):
    out = tmp_path / "out"
    launch(
        accelerate_config,
        f"--output_dir={out}",
        "--max_train_steps=6",
        "--checkpointing_steps=2",
        "--checkpoints_total_limit=2",
        "--validation_steps=3",
        "--no-ema_warmup",
        "--report_to=tensorboard",
    )
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # losses and validation grids went to the tracker
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    checkpoint = out / "checkpoint-6"
    assert (checkpoint / "transformer" / "config.json").exists()
    ema_config = json.loads((checkpoint / "transformer_ema" / "config.json").read_text())
    assert ema_config["decay"] == 0.9999 and ema_config["min_decay"] == 0.9999 and ema_config["optimization_step"] == 6
    assert sorted(p.name for p in (out / "samples").glob("step_*.png")) == ["step_0000003.png", "step_0000006.png"]
    # the output folder holds the EMA weights, which differ from the raw weights after 6 steps at decay 0.9999
    raw = transformer_weights(checkpoint)
    final = transformer_weights(out)
    ema = load_file(checkpoint / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    key = "proj_out_2.weight"
    assert torch.equal(final[key], ema[key]) and not torch.equal(final[key], raw[key])
    assert len((out / "loss_history.csv").read_text().splitlines()) == 6


def test_resume_continues_the_same_run(tmp_path, accelerate_config):
    common = ["--max_train_steps=4", "--checkpointing_steps=2", "--validation_steps=100"]
    launch(accelerate_config, f"--output_dir={tmp_path / 'straight'}", *common)
    launch(
        accelerate_config,
        f"--output_dir={tmp_path / 'resumed'}",
        "--max_train_steps=2",
        "--checkpointing_steps=2",
        "--validation_steps=100",
    )
    result = launch(
        accelerate_config, f"--output_dir={tmp_path / 'resumed'}", *common, "--resume_from_checkpoint=latest"
    )
    assert "Resuming from" in result.stderr + result.stdout
    straight, resumed = transformer_weights(tmp_path / "straight"), transformer_weights(tmp_path / "resumed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_gradient_accumulation_and_disable_routing(tmp_path, accelerate_config):
    out = tmp_path / "out"
    launch(
        accelerate_config,
        f"--output_dir={out}",
        "--max_train_steps=2",
        "--gradient_accumulation_steps=2",
        "--checkpointing_steps=1",
        "--validation_steps=100",
        "--disable_routing_after_step=1",
        "--selection_ratio_warmup_steps=2",
        "--routes=1:3:0.25,5:6:0.5",
        "--route_reinsertion=pre_route_plus_input",
        "--gradient_checkpointing",
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["routes"] == [
        {"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.25},
        {"start_layer_idx": 5, "end_layer_idx": 6, "selection_ratio": 0.5},
    ]
    assert config["route_reinsertion"] == "pre_route_plus_input"


def test_routes_shorthand_and_json_parse():
    assert parse_routes("2:8:0.5,10:12:0.3") == [
        {"start_layer_idx": 2, "end_layer_idx": 8, "selection_ratio": 0.5},
        {"start_layer_idx": 10, "end_layer_idx": 12, "selection_ratio": 0.3},
    ]
    assert (
        parse_routes('[{"start_layer_idx": 2, "end_layer_idx": -4, "selection_ratio": 0.5}]')[0]["end_layer_idx"] == -4
    )
    assert parse_routes("none") == [] and parse_routes("paper") == "paper"
    with pytest.raises(Exception, match="start:end:ratio"):
        parse_routes("2-8-0.5")


def test_bad_inputs_fail_with_clear_messages(tmp_path, accelerate_config):
    script = load_script()
    with pytest.raises(ValueError, match=r"route 0 .*outside the model's layers"):
        script.main([*TINY, f"--output_dir={tmp_path}", "--routes=2:9:0.5", "--max_train_steps=1"])
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        script.main([*TINY[1:], "--resolution=9", f"--output_dir={tmp_path}", "--max_train_steps=1"])


def test_push_to_hub_uploads_the_final_folder_and_never_the_token(tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    script = load_script()
    calls = []
    monkeypatch.setattr(
        hub.uploads,
        "create_repo",
        lambda repo_id, **kw: (
            calls.append(("create", repo_id, kw)) or type("Repo", (), {"repo_id": f"user/{repo_id}"})()
        ),
    )

    class Done:
        def result(self):
            return None

    def fake_upload(**kwargs):
        calls.append(("upload", kwargs["folder_path"], kwargs))
        return Done()

    monkeypatch.setattr(hub.uploads, "upload_folder", fake_upload)  # the one upload path of both scripts
    token = "hf_FAKEtoken1234567890abcdefghij"
    out = tmp_path / "tread-push"
    script.main(
        [
            *TINY,
            f"--output_dir={out}",
            "--max_train_steps=2",
            "--checkpointing_steps=1",
            "--validation_steps=100",
            "--push_to_hub",
            "--push_checkpoints",
            f"--hub_token={token}",
        ]
    )
    assert calls[0][:2] == ("create", "tread-push") and calls[0][2]["token"] == token
    uploads = [c for c in calls if c[0] == "upload"]
    assert [Path(c[1]).name for c in uploads] == ["checkpoint-1", "checkpoint-2", "tread-push"]
    final = uploads[-1][2]
    assert final["repo_id"] == "user/tread-push" and "checkpoint-*" in final["ignore_patterns"]
    assert uploads[0][2]["run_as_future"] and uploads[0][2]["path_in_repo"] == "checkpoint-1"
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert "<redacted>" in (out / "README.md").read_text()
    captured = capsys.readouterr()
    assert caplog.text and token not in captured.out + captured.err + caplog.text  # nor in any log line


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    vae = tiny_vae()
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def digits_latents(tmp_path_factory, accelerate_config, vae_dir):
    """16x16 digits through the tiny VAE: 8x8x4 latent shards written by training/extract_latents.py."""
    latents_dir = tmp_path_factory.mktemp("latents")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    extract = [
        "accelerate", "launch", "--config_file", accelerate_config, "--num_processes", "1",
        str(REPO / "training" / "extract_latents.py"), "--use_digits", "--resolution=16", f"--vae={vae_dir}",
        f"--output_dir={latents_dir}", "--batch_size=64", "--shard_size=500",
    ]  # fmt: skip
    result = subprocess.run(extract, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return latents_dir


def test_training_from_latents_matches_training_through_the_vae(tmp_path, accelerate_config, vae_dir, digits_latents):
    """Extract once, then train from the shards or encode on the fly: the same run (posterior mean both ways)."""
    latents_dir = digits_latents
    common = [
        "--resolution=16",
        "--max_train_steps=2",
        "--learning_rate=1e-4",
        "--checkpointing_steps=100",
        "--validation_steps=100",
    ]
    launch(accelerate_config, f"--output_dir={tmp_path / 'from_latents'}", f"--latents_dir={latents_dir}", *common)
    launch(accelerate_config, f"--output_dir={tmp_path / 'through_vae'}", f"--vae={vae_dir}", *common)
    from_latents = transformer_weights(tmp_path / "from_latents")
    through_vae = transformer_weights(tmp_path / "through_vae")
    for key in from_latents:
        torch.testing.assert_close(from_latents[key], through_vae[key], rtol=1e-4, atol=1e-5, msg=key)
    pipe = TreadDiTPipeline.from_pretrained(tmp_path / "from_latents")
    assert (
        pipe.vae is not None and pipe.transformer.config.in_channels == 4 and pipe.transformer.config.sample_size == 8
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe([1], num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_latents_from_another_vae_are_rejected(tmp_path, vae_dir, digits_latents):
    script = load_script()
    other_vae = tmp_path / "other-vae"
    shutil.copytree(vae_dir, other_vae)
    with pytest.raises(ValueError, match="VAE"):
        script.main([*TINY, "--resolution=16", f"--output_dir={tmp_path / 'out'}", f"--latents_dir={digits_latents}",
                     f"--vae={other_vae}", "--max_train_steps=1"])  # fmt: skip


def test_latents_options_the_extraction_did_not_store_are_refused(tmp_path, digits_latents, capsys):
    """--random_flip, --resolution, --sample_posterior with --latents_dir: refused at parse time when the latents cannot
    honour them, instead of being ignored without a word (digits_latents: 16 px, no --flip, posterior means)."""
    script = load_script()
    latents = f"--latents_dir={digits_latents}"
    script.parse_args([latents, "--resolution=16"])  # the extracted resolution
    for option, expected in (
        ("--random_flip", "extracted without --flip, so there are no flipped copies"),
        ("--resolution=32", "--resolution 32: the latents were extracted from images at 16 px"),
        ("--sample_posterior", "the latents hold the VAE posterior means"),
    ):
        with pytest.raises(SystemExit):
            script.parse_args([latents, option])
        assert expected in capsys.readouterr().err, option
    with pytest.raises(SystemExit):
        script.parse_args([f"--latents_dir={tmp_path / 'missing'}"])
    assert "metadata.json not found" in capsys.readouterr().err

    # latents that hold flipped copies and posterior samples: --random_flip is honoured, --sample_posterior warned about
    stored = tmp_path / "stored"
    stored.mkdir()
    metadata = json.loads((digits_latents / "metadata.json").read_text())
    (stored / "metadata.json").write_text(json.dumps({**metadata, "flip": True, "sample_posterior": True}))
    script.parse_args([f"--latents_dir={stored}", "--random_flip"])
    with pytest.warns(UserWarning, match="one posterior sample per image, drawn once at extraction"):
        script.parse_args([f"--latents_dir={stored}", "--sample_posterior"])


def test_lora_fine_tune_trains_only_adapters_and_the_pipeline_loads_scales_fuses_and_unloads_them(
    tmp_path, accelerate_config
):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_tread import TreadTransformer2DModel

    routes = [{"start_layer_idx": 2, "end_layer_idx": 4, "selection_ratio": 0.5}]
    torch.manual_seed(0)
    base = TreadTransformer2DModel.from_preset(
        "DiT-Tiny/2", routes=routes, in_channels=1, out_channels=None, sample_size=8, num_embeds_ada_norm=10
    )
    id2label = {i: str(i) for i in range(10)}
    TreadDiTPipeline(base, None, FlowMatchEulerDiscreteScheduler(), id2label).save_pretrained(tmp_path / "base")
    out = tmp_path / "lora"
    lora = ["--lora_rank=4", "--lora_target_modules=to_q,to_v", "--learning_rate=1e-2", "--validation_steps=100"]
    launch(accelerate_config, f"--pretrained_model_name_or_path={tmp_path / 'base'}", f"--output_dir={out}",
           "--max_train_steps=2", "--checkpointing_steps=2", *lora)  # fmt: skip
    assert (out / "checkpoint-2" / "transformer_lora" / "pytorch_lora_weights.safetensors").exists()
    launch(accelerate_config, f"--pretrained_model_name_or_path={tmp_path / 'base'}", f"--output_dir={out}",
           "--max_train_steps=3", "--resume_from_checkpoint=latest", *lora)  # fmt: skip

    # only adapter weights changed: the saved base transformer is the pretrained one
    saved, pretrained = transformer_weights(out), transformer_weights(tmp_path / "base")
    assert saved.keys() == pretrained.keys() and all(torch.equal(saved[k], pretrained[k]) for k in saved)
    adapters = load_file(out / "pytorch_lora_weights.safetensors")
    assert adapters and all("lora_" in k and (".to_q." in k or ".to_v." in k) for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # trained away from zero
    assert json.loads((out / "tread_card.json").read_text())["ema"] == "off"  # LoRA runs keep no EMA

    pipe = TreadDiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe(
            [3], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent"
        ).images

    plain = sample()
    pipe.load_lora_weights(out)
    adapted = sample()
    pipe.set_adapters("default", 0.5)
    half = sample()
    assert not torch.equal(adapted, plain) and not torch.equal(half, adapted)
    pipe.fuse_lora()
    torch.testing.assert_close(sample(), half, rtol=1e-4, atol=1e-5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(sample(), plain, rtol=1e-5, atol=1e-6)


def test_selection_ratio_schedule():
    routes = [{"selection_ratio": 0.5}, {"selection_ratio": 0.2}]

    def ratios(step, warmup=100, anneal=50):
        return scheduled_selection_ratios(routes, step, 1000, warmup, anneal)

    assert ratios(0) == [0.0, 0.0]
    assert ratios(50) == [0.25, 0.1]
    assert ratios(500) is None  # the configured ratios
    assert ratios(975) == [0.25, 0.1]
    assert ratios(0, warmup=0, anneal=0) is None and scheduled_selection_ratios([], 0, 1000, 100) is None


def test_lr_scheduler_does_not_set_max_train_steps():
    args = argparse.Namespace(
        max_train_steps=None,
        num_train_epochs=3,
        gradient_accumulation_steps=2,
        lr_scheduler="linear",
        lr_warmup_steps=1,
    )
    assert train_steps_for(args, range(5)) == 9  # 3 epochs x ceil(5 batches / 2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_lr_scheduler(optimizer, args, 9, num_processes=2)
    assert args.max_train_steps is None  # the caller stores the count, explicitly
    for _ in range(2 * 9):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [0.0]  # linear decay over 9 updates x 2 processes
    assert train_steps_for(argparse.Namespace(max_train_steps=4), None) == 4


def test_run_state_carries_what_the_stages_share():
    args = argparse.Namespace(train_batch_size=4, gradient_accumulation_steps=3)
    accelerator = argparse.Namespace(num_processes=2)
    run = RunState(args, ["--x"], accelerator, "user/repo", started=time.time() - 60)
    assert run.total_batch_size == 24 and run.generator is None and run.uploads is None
    run.started -= 30  # a resumed run's earlier time counts
    assert 90 <= run.elapsed < 100


def test_a_damaged_latent_shard_is_named_before_training(tmp_path, digits_latents):
    """Issue #21 item 4: a shard zeroed in place (same size) trained without a word, and a truncated one gave a
    SafetensorError traceback without the file's name; training names the file in one message."""
    script = load_script()
    latents = tmp_path / "latents"
    shutil.copytree(digits_latents, latents)
    shard = sorted(latents.glob("latents-*.safetensors"))[0]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    args = [*TINY, "--resolution=16", f"--output_dir={tmp_path / 'out'}", f"--latents_dir={latents}",
            "--max_train_steps=1"]  # fmt: skip
    with pytest.raises(ValueError, match=rf"The latent shard {shard} changed since extraction"):
        script.main(args)
    with pytest.raises(ValueError, match=rf"The latent shard {shard} does not load"):  # the checksum skipped
        script.main([*args, "--skip_latents_checksum"])
