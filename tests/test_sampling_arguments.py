"""Sampling arguments that would give wrong images without a word (issue #21 item 9): 0 steps return the initial
noise, negative or fractional steps end in numpy's messages, guidance scales inf or 1e30 give black images and NaN
is silently unguided. The pipeline (`TreadDiTPipeline.check_inputs`) and every script that samples refuse them, naming
the argument and its valid range; the Space's checks are in tests/test_space.py."""

import numpy as np
import pytest
import torch
from conftest import REPO, load_module, tiny_tread
from diffusers import DDIMScheduler

from diffusers_tread import TreadDiTPipeline

BAD_STEPS = [0, -1, 2.5, 2.0, "2", True]
BAD_SCALES = [float("inf"), float("-inf"), float("nan"), 1e30, 101.0, "2", True]


@pytest.fixture(scope="module")
def pipe():
    transformer = tiny_tread(in_channels=3, out_channels=None, num_embeds_ada_norm=4).eval()
    pipe = TreadDiTPipeline(transformer=transformer, vae=None, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("steps", BAD_STEPS)
def test_pipeline_refuses_step_counts_that_are_not_whole_numbers_from_1(pipe, steps):
    with pytest.raises(ValueError, match=r"num_inference_steps must be a whole number >= 1, got"):
        pipe([0], num_inference_steps=steps, output_type="np")


@pytest.mark.parametrize("scale", BAD_SCALES)
@pytest.mark.parametrize("name", ["guidance_scale", "sparse_guidance_scale"])
def test_pipeline_refuses_guidance_scales_that_are_not_finite_or_too_large(pipe, name, scale):
    kwargs = {"guidance": "sparse"} if name == "sparse_guidance_scale" else {}
    with pytest.raises(ValueError, match=rf"^{name} must be (a finite number|at most) .*100"):
        pipe([0], num_inference_steps=1, output_type="np", **{name: scale}, **kwargs)


def test_pipeline_accepts_the_edges_of_the_ranges(pipe):
    images = pipe([0], num_inference_steps=np.int64(1), guidance_scale=100.0, output_type="np").images
    assert np.isfinite(images).all()
    assert pipe([0], num_inference_steps=1, guidance_scale=-3, output_type="np").images.shape == (1, 8, 8, 3)


@pytest.mark.parametrize(
    "option, message",
    [
        ("--num_inference_steps=0", "--num_inference_steps must be a whole number >= 1, got 0"),
        ("--num_inference_steps=-3", "--num_inference_steps must be a whole number >= 1, got -3"),
        ("--guidance_scale=inf", "--guidance_scale must be a finite number <= 100"),
        ("--guidance_scale=nan", "--guidance_scale must be a finite number <= 100"),
        ("--guidance_scale=1e30", "--guidance_scale must be at most 100"),
    ],
)
def test_evaluate_refuses_them_before_sampling(option, message, tmp_path, capsys):
    evaluate = load_module(REPO / "training" / "evaluate.py")
    with pytest.raises(SystemExit) as error:
        evaluate.parse_args(["--pipeline=p", f"--output_dir={tmp_path / 'out'}", option])
    assert error.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script, base",
    [
        ("train_tread.py", []),
        ("train_tread_t2i_lora.py", ["--pretrained_model_name_or_path=org/model", "--train_data_dir=images"]),
    ],
)
def test_training_scripts_refuse_them_before_training(script, base, capsys):
    module = load_module(REPO / "training" / script)
    for option, message in [
        ("--validation_num_inference_steps=0", "--validation_num_inference_steps must be a whole number >= 1"),
        ("--validation_guidance_scale=nan", "--validation_guidance_scale must be a finite number <= 100"),
        ("--validation_guidance_scale=1e30", "--validation_guidance_scale must be at most 100"),
    ]:
        with pytest.raises(SystemExit):
            module.parse_args([*base, option])
        assert message in capsys.readouterr().err, option


def test_check_inputs_is_called_before_any_work(pipe, monkeypatch):
    """A Diffusers-style `check_inputs`: it runs before the noise is drawn or the scheduler is set."""
    monkeypatch.setattr(pipe.scheduler, "set_timesteps", lambda *a, **k: pytest.fail("set_timesteps ran"))
    before = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe([0], num_inference_steps=0)
    assert torch.equal(before, torch.random.get_rng_state())
