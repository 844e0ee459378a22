"""`pipelines/tread_dit/`: the plain-Diffusers pipeline and transformer code, committed, generated from the library by
`python -m diffusers_tread.hub`. Regenerating gives no diff, and the committed files load and sample a saved pipeline
with `diffusers` alone (the package's import blocked), equal to the library's samples."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import torch
from conftest import REPO, tiny_tread
from diffusers import DDIMScheduler

from diffusers_tread import TreadDiTPipeline, __version__, hub

COMMITTED = REPO / "pipelines" / "tread_dit"


def test_committed_bundle_is_what_the_library_generates():
    generated = hub.bundle_files()
    committed = {p.relative_to(COMMITTED).as_posix(): p.read_text() for p in COMMITTED.rglob("*.py")}
    assert committed.keys() == generated.keys()
    for path, text in generated.items():
        assert committed[path] == text, f"pipelines/tread_dit/{path} is stale: run `python -m diffusers_tread.hub`"
    assert f"from diffusers_tread {__version__}: do not edit" in committed["tread_dit.py"].splitlines()[0]


def test_committed_files_sample_a_saved_pipeline_with_diffusers_alone(tmp_path):
    transformer = tiny_tread(routes=[{"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.5}],
                             num_embeds_ada_norm=4, shared_conditioning=True).eval()  # fmt: skip
    pipe = TreadDiTPipeline(transformer=transformer, vae=None, scheduler=DDIMScheduler(), id2label={0: "zero"})
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    # Point the saved folder at the committed code, as a Hub repo of it would be.
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(hub.remote_code_model_index(index)))
    for path in COMMITTED.rglob("*.py"):
        shutil.copy(path, folder / path.relative_to(COMMITTED))
    expected = pipe([0, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images

    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "diffusers_tread":
                    raise ModuleNotFoundError(name + " is blocked", name=name)
        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe([0, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
        np.save({str(tmp_path / "images.npy")!r}, images.images)
        print(type(pipe).__module__, type(pipe.transformer).__module__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-I", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["diffusers_modules.local.tread_dit"] * 2
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), expected, atol=1e-6)
