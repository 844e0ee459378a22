"""The package is whole as a wheel: installed outside the source tree, it renders the model cards (DiT and LoRA),
prepares the Space from the templates it ships (setup.py's data packages), not from files of a checkout, and the
training script trains with it and writes its card."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

from conftest import REPO, TINY


def test_wheel_installed_outside_the_tree_renders_a_card_and_prepares_the_space(tmp_path):
    wheels, site, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # Build from a copy: setuptools builds inside the source folder, whose build/ may hold files deleted since.
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(REPO, source, ignore=ignore)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    build.append(str(source))
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("diffusers_tread-*.whl")
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)

    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(site)!r})  # the installed wheel first: not the checkout's editable install
        from diffusers_tread import hub
        card = hub.render_model_card(hub.ModelCardInfo(model_name="tread-tiny", repo_id="org/tread-tiny"))
        lora = hub.render_lora_model_card(hub.LoraCardInfo(
            base_model="org/base", pipeline_class="FluxPipeline", transformer_class="FluxTransformer2DModel",
            family="flux", rank=4, lora_alpha=4, target_modules=["to_q"], repo_id="org/tread-lora"))
        space = hub.prepare_space({str(tmp_path / "space")!r}, "org/tread-tiny")
        print(json.dumps({{"hub": hub.__file__, "template": str(hub.MODEL_CARD_TEMPLATE), "space_dir": str(hub.SPACE_DIR),
                          "lora_template": str(hub.LORA_MODEL_CARD_TEMPLATE), "card": str(card), "lora": str(lora),
                          "space": sorted(p.name for p in space.iterdir())}}))
        """
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    for key in ("hub", "template", "lora_template", "space_dir"):
        assert report[key].startswith(str(site)), (key, report[key])
    assert "org/tread-tiny" in report["card"] and "TREAD" in report["card"]
    assert 'pipe.load_lora_weights("org/tread-lora")' in report["lora"]
    assert {"app.py", "README.md", "requirements.txt"} <= set(report["space"])
    assert "org/tread-tiny" in (tmp_path / "space" / "README.md").read_text()

    # the training script (as downloaded with the repository) trains on the installed wheel and writes its card
    out = tmp_path / "run"
    train = textwrap.dedent(
        f"""
        import runpy, sys
        sys.path.insert(0, {str(site)!r})
        import diffusers_tread
        assert diffusers_tread.__file__.startswith({str(site)!r}), diffusers_tread.__file__
        sys.argv = ["train_tread.py", *{TINY!r}, "--output_dir={out}", "--max_train_steps=2", "--validation_steps=100"]
        runpy.run_path({str(source / "training" / "train_tread.py")!r}, run_name="__main__")
        """
    )
    result = subprocess.run([sys.executable, "-c", train], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    card = (out / "README.md").read_text()
    assert "TREAD" in card and "| steps | 2 |" in card and (out / "training_complete.json").is_file()
