"""bench/diffusers_suite/run.py (Diffusers' own DiT tests against our classes), on a stand-in Diffusers checkout, and
the known difference it marks for AttentionMixin's processor-count check."""

import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, load_module, tiny_tread
from diffusers.models.attention_processor import AttnProcessor

RUNNER = REPO / "bench" / "diffusers_suite" / "run.py"

MODEL_TESTS = """
import pytest
from diffusers import DiTTransformer2DModel, Transformer2DModel


class TestDiTTransformer2D:
    def test_model_class(self):
        assert DiTTransformer2DModel.__name__ == "TreadTransformer2DModel"
        assert {"DiTTransformer2DModel"} == {DiTTransformer2DModel.__name__}  # names in strings follow

    def test_correct_class_remapping_from_dict_config(self):
        assert Transformer2DModel.__name__ == "DiTTransformer2DModel"  # not rewritten
        assert False


class TestDiTTransformer2DAttention:
    def test_attention_processor_count_mismatch_raises_error(self):
        assert False
"""

PIPELINE_TESTS = """
import unittest

from diffusers import (
    AutoencoderKL,
    DiTPipeline,
    DiTTransformer2DModel,
)


class DiTPipelineFastTests(unittest.TestCase):
    pipeline_class = DiTPipeline

    def test_classes(self):
        assert self.pipeline_class.__name__ == "TreadDiTPipeline" and AutoencoderKL.__name__ == "AutoencoderKL"
        assert DiTTransformer2DModel.__name__ == "TreadTransformer2DModel"
"""


def load_runner():
    return load_module(RUNNER, "diffusers_suite_run")


def fake_checkout(root):
    """A stand-in for a Diffusers checkout: the two DiT test files (one known difference missing on purpose)."""
    for relative, text in [
        ("tests/__init__.py", ""),
        ("tests/models/__init__.py", ""),
        ("tests/models/transformers/__init__.py", ""),
        ("tests/models/transformers/test_models_dit_transformer2d.py", MODEL_TESTS),
        ("tests/pipelines/__init__.py", ""),
        ("tests/pipelines/dit/__init__.py", ""),
        ("tests/pipelines/dit/test_dit.py", PIPELINE_TESTS),
    ]:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def run(*args):
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=300)


def test_rewrite_points_names_at_our_classes_but_keeps_the_diffusers_imports():
    runner = load_runner()
    source = "from diffusers import (\n    DiTPipeline,\n    DDIMScheduler,\n)\n\nx = [DiTPipeline, 'DiTPipeline']\n"
    rewritten = runner.rewrite(source, {"DiTPipeline": "TreadDiTPipeline"})
    assert rewritten == (
        "from diffusers import (\n    DiTPipeline,\n    DDIMScheduler,\n)\n"
        "from diffusers_tread import TreadDiTPipeline\n\nx = [TreadDiTPipeline, 'TreadDiTPipeline']\n"
    )
    assert "DiTPipelineFastTests" in runner.rewrite(
        "from diffusers import DiTPipeline\nDiTPipelineFastTests\n", {"DiTPipeline": "TreadDiTPipeline"}
    )  # whole identifiers only
    with pytest.raises(SystemExit, match="not imported from diffusers"):
        runner.rewrite("from diffusers import DDIMScheduler\n", {"DiTPipeline": "TreadDiTPipeline"})


def test_runner_on_a_work_tree_and_a_git_directory(tmp_path):
    checkout = fake_checkout(tmp_path / "diffusers")
    ours = run(str(checkout), "--", "-q")
    # the missing known difference (remapping_from_pretrained_config) is simply not collected
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert "2 passed, 2 xfailed" in ours.stdout
    stock = run(str(checkout), "--stock", "--", "-q")
    assert stock.returncode == 1 and "4 failed" in stock.stdout, stock.stdout

    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "tests"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "tests"], check=True)
    (checkout / "tests" / "pipelines" / "dit" / "test_dit.py").unlink()  # only the committed tree is used
    archived = run(str(checkout / ".git"), "--ref", "HEAD", "--", "-q")
    assert archived.returncode == 0 and "2 passed, 2 xfailed" in archived.stdout, archived.stdout


def test_attention_processor_count_mismatch_raises_with_two_attention_layers():
    """Diffusers' test of this uses a one-layer model, whose one-entry dict has the right count (see run.py)."""
    model = tiny_tread(num_layers=2)
    assert len(model.attn_processors) == 2
    with pytest.raises(ValueError, match="number of processors 1 does not match"):
        model.set_attn_processor({"transformer_blocks.0.attn1.processor": AttnProcessor()})
