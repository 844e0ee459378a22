"""Hub integration (diffusers_tread.hub, training/push_to_hub.py): model cards, the generated remote-code bundle
(loaded by plain Diffusers in a fresh interpreter that cannot import diffusers_tread), Hub-ready folders and pushes.
Everything runs offline against a simulated Hub."""

import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_module, tiny_tread, tiny_vae
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.dynamic_modules_utils import get_relative_imports
from huggingface_hub import EvalResult, ModelCard, ModelCardData, SpaceCard
from safetensors.torch import load_file

from diffusers_tread import TreadDiTPipeline, TreadTransformer2DModel, hub, routing
from diffusers_tread.pipelines import pipeline_tread_dit

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hf_FAKEtokenHub0123456789abcdefghij"
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish", 2: "golden retriever", 3: "tabby, tabby cat"}
ROUTES = [{"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.5}]
# What the pipeline offers right now: "cfg" always (the default call), more kinds once it takes `guidance=`.
GUIDANCE = ["default"] + list(getattr(pipeline_tread_dit, "GUIDANCE_KINDS", ()))[1:2]


def tiny_pipeline() -> TreadDiTPipeline:
    # the layout training writes (one shared conditioning embedder, from_preset's default)
    transformer = tiny_tread(routes=ROUTES, num_embeds_ada_norm=len(ID2LABEL), shared_conditioning=True).eval()
    pipe = TreadDiTPipeline(
        transformer=transformer, vae=tiny_vae().eval(), scheduler=DDIMScheduler(), id2label=ID2LABEL
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def card_info(**overrides) -> hub.ModelCardInfo:
    info = dict(
        model_name="tread-tiny",
        backbone="DiT, 6 layers, width 16, patch 2",
        num_parameters="0.05M",
        num_tokens=16,
        routes=json.dumps(ROUTES),
        route_reinsertion="pre_route",
        objective='{"name": "ddpm", "num_train_timesteps": 1000}',
        tread_loss="adapted (MAE weight 0.1)",
        dataset="tiny",
        num_examples=64,
        num_classes=4,
        data_space="VAE latents",
        steps=2,
        global_batch_size=8,
        learning_rate=1e-4,
        lr_scheduler="constant",
        ema="off",
        hardware="CPU (x86_64, 2 cores)",
        training_time="0.1 min",
        final_loss="0.5000",
        command="accelerate launch training/train_tread.py --hub_token <redacted>",
        example_labels=[1, "golden retriever"],
    )
    return hub.ModelCardInfo(**{**info, **overrides})


@pytest.fixture
def output_folder(tmp_path):
    """A training output folder: the pipeline, its card, samples, a checkpoint and the loss log."""
    folder = tmp_path / "tread-tiny"
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder)
    hub.save_model_card(folder, card_info(), ModelCardData(license="apache-2.0", datasets=["org/tiny-data"]))
    (folder / "samples").mkdir()
    (folder / "samples" / "final_grid.png").write_bytes(b"png")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.bin").write_bytes(b"state")
    (folder / "loss_history.csv").write_text("1,0.6,1.0\n2,0.5,2.0\n")
    return folder


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fid_result(value: float, metric_name: str) -> EvalResult:
    """An FID ``EvalResult`` on ImageNet for the card's ``model-index``."""
    return EvalResult(
        task_type=hub.PIPELINE_TAG,
        task_name="Class-conditional image generation",
        dataset_type="imagenet-1k",
        dataset_name="ImageNet 256x256",
        dataset_split="train",
        metric_type="fid",
        metric_name=metric_name,
        metric_value=value,
    )


def is_remote_code_index(model_index: dict) -> bool:
    """Whether a ``model_index.json`` names the remote-code bundle (needs ``trust_remote_code=True`` to load)."""
    return hub.library_model_index(model_index) != dict(model_index)


def load_push_script():
    return load_module(REPO / "training" / "push_to_hub.py")


# --- the generated remote-code module ---------------------------------------------------------------------------------


def test_bundle_is_generated_from_the_library_sources(tmp_path):
    files = hub.bundle_files()
    assert files.keys() == {"tread_dit.py", "transformer/tread_dit.py"}
    pipeline, models = files["tread_dit.py"], files["transformer/tread_dit.py"]
    # Whole functions and methods appear verbatim: the bundle is the library's code, not a hand-kept copy.
    for function, text in (
        (routing.validate_routes, models),
        (routing.sample_kept_indices, models),
        (TreadTransformer2DModel.from_preset, models),
        (TreadDiTPipeline.__call__, pipeline),
        (TreadDiTPipeline._class_ids, pipeline),
    ):
        assert inspect.getsource(function) in text, function.__qualname__
    assert not re.search(r"\brouting\.[a-z_]+\(", models)  # `routing.f(...)` calls became `f(...)`
    for source in ("routing.py", "models/transformer_tread.py"):
        assert f"diffusers_tread/{source}" in models.splitlines()[2]
    assert "diffusers_tread/pipelines/pipeline_tread_dit.py" in pipeline.splitlines()[2]
    # The root module is the pipeline only; the transformer's module holds the models this checkpoint needs.
    assert "class TreadTransformer2DModel" not in pipeline and "class TreadDiTPipeline" not in models
    assert "class TreadSSM2DModel" not in models
    assert "from .transformer.tread_dit import TreadTransformer2DModel\n" in pipeline

    # What Diffusers' dynamic-module loader scans: the root fetches the transformer's module (the one relative import
    # it allows: `<folder>.<module>`), which fetches nothing; neither imports this package.
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        expected = ["transformer.tread_dit"] if relative == "tread_dit.py" else []
        assert get_relative_imports(path) == expected, relative
        imported = re.findall(r"^\s*(?:import|from)\s+(\S+)", text, flags=re.MULTILINE)
        assert imported and not [name for name in imported if name.split(".")[0] == "diffusers_tread"]
        assert [name for name in imported if name.startswith(".")] == [".transformer.tread_dit"][: len(expected)]


def test_pipeline_checks_configs_not_classes_so_a_bundle_transformer_is_kept(tmp_path, monkeypatch):
    # Diffusers runs the bundle's transformer module under another name than the one the pipeline imports, so its
    # class is not the pipeline's TreadTransformer2DModel: from_pretrained must not take it for a stock DiT.
    path = tmp_path / "bundle_models.py"
    path.write_text(hub.bundle_files()["transformer/tread_dit.py"])
    monkeypatch.delitem(sys.modules, "bundle_models", raising=False)  # undone after the test
    bundle = load_module(path, "bundle_models", register=True)  # dataclasses look their module up
    library = tiny_pipeline()
    library.save_pretrained(tmp_path / "pipe")
    transformer = bundle.TreadTransformer2DModel.from_config(library.transformer.config)
    transformer.load_state_dict(library.transformer.state_dict())
    assert not isinstance(transformer, TreadTransformer2DModel)
    pipe = TreadDiTPipeline.from_pretrained(tmp_path / "pipe", transformer=transformer)
    assert pipe.transformer is transformer and pipe.transformer.config.routes == ROUTES


def test_generator_inlines_namespaces_and_rejects_what_it_cannot_inline(tmp_path, monkeypatch):
    package = tmp_path / "diffusers_tread"
    (package / "sub").mkdir(parents=True)
    (package / "util.py").write_text('"""Util."""\nimport math\n\nX = 1\n\n\ndef f():\n    return X + math.e\n')
    (package / "sub" / "mod.py").write_text(
        '"""Mod."""\nimport math\nfrom math import tau\n\nfrom .. import util\nfrom ..util import f\n\n\n'
        "def g():\n    return util.f() + f() + util.X + math.pi + tau\n"
    )
    monkeypatch.setattr(hub.bundle, "PACKAGE_DIR", package)
    text = hub.generate_module("diffusers_tread.sub.mod")
    assert text.index("def f()") < text.index("def g()")
    assert "return f() + f() + X + math.pi + tau" in text and "import math\nfrom math import tau" in text
    namespace = {}
    exec(compile(text, "bundle", "exec"), namespace)
    assert namespace["g"]() == pytest.approx(2 * (1 + np.e) + 1 + np.pi + 2 * np.pi)

    cases = {
        "clash.py": ("from .util import f\nX = 2\n", "defined in both"),
        "alias.py": ("from . import util\nh = util\n", "used other than"),
        "nested.py": ("def k():\n    from .util import f\n    return f\n", "only top-level imports"),
        "init.py": ("from .sub import mod\nfrom .sub import g\n", "package `__init__` cannot be inlined"),
    }
    for name, (source, message) in cases.items():
        (package / name).write_text(source)
        with pytest.raises(ValueError, match=re.escape(message)):
            hub.generate_module(f"diffusers_tread.{name[:-3]}")


def test_model_index_layouts_round_trip():
    library = {
        "_class_name": "TreadDiTPipeline",
        "transformer": ["diffusers_tread", "TreadTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": [None, None],
        "id2label": {"0": "a"},
    }
    remote = hub.remote_code_model_index(library)
    assert remote["_class_name"] == ["tread_dit", "TreadDiTPipeline"]
    assert remote["transformer"] == ["tread_dit", "TreadTransformer2DModel"]
    assert remote["scheduler"] == library["scheduler"] and remote["vae"] == [None, None]
    assert hub.library_model_index(remote) == library
    assert is_remote_code_index(remote) and not is_remote_code_index(library)
    with pytest.raises(ValueError, match="no diffusers_tread.Unknown"):
        hub.remote_code_model_index({**library, "other": ["diffusers_tread", "Unknown"]})


# --- model cards -------------------------------------------------------------------------------------------------------


def test_model_card_metadata_parses_back(tmp_path):
    card_data = ModelCardData(license="apache-2.0", base_model="facebook/DiT-XL-2-256", datasets=["imagenet-1k"])
    fid = fid_result(7.38, metric_name="FID-50K (cfg 1.5)")
    info = card_info(repo_id="user/tread-tiny", demo_url="https://huggingface.co/spaces/user/tread-tiny-demo")
    hub.save_model_card(tmp_path, info, card_data, eval_results=[fid])

    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.library_name == "diffusers" and data.license == "apache-2.0"
    assert {"tread", "diffusers-tread", "dit"} <= set(data.tags)
    assert data.base_model == "facebook/DiT-XL-2-256" and data.datasets == ["imagenet-1k"]
    assert data.pipeline_tag == "unconditional-image-generation" and data.model_name == "tread-tiny"
    (result,) = data.eval_results  # the model-index block, parsed back into EvalResult
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("fid", 7.38, "imagenet-1k")
    assert result.metric_name == "FID-50K (cfg 1.5)" and result.task_type == data.pipeline_tag
    assert "model-index" in card.content.split("---")[1]

    text = card.text
    for expected in (
        "| routes | `[{",
        "(pre_route re-insertion)",
        '| objective | `{"name": "ddpm"',
        "| TREAD loss | adapted (MAE weight 0.1) |",
        "| steps | 2 |",
        "| batch size (global) | 8 |",
        "| hardware | CPU (x86_64, 2 cores) |",
        "| training time | 0.1 min |",
        "| FID-50K (cfg 1.5) | 7.38 | ImageNet 256x256 (train) |",
        "![samples: one row per class](samples/final_grid.png)",
        "https://huggingface.co/spaces/user/tread-tiny-demo",
        'DiffusionPipeline.from_pretrained("user/tread-tiny", trust_remote_code=True)',
        'TreadDiTPipeline.from_pretrained("user/tread-tiny")',
        "class_labels=[1, 'golden retriever']",
        "--hub_token <redacted>",
        "fine-tuned from\n[`facebook/DiT-XL-2-256`]",
    ):
        assert expected in text, expected
    assert "\n\n\n" not in text
    assert hub.load_model_card_info(tmp_path) == info

    # Unknown fields are left out rather than rendered as None.
    hub.save_model_card(tmp_path, hub.ModelCardInfo(model_name="bare", grid=None, loss_plot=None))
    bare = ModelCard.load(tmp_path / "README.md")
    assert "None" not in bare.text and "## Training" not in bare.text and "## Evaluation" not in bare.text
    assert bare.data.eval_results is None and "tread" in bare.data.tags


def test_lora_model_card_metadata_loading_snippet_and_table(tmp_path):
    """The text-to-image LoRA card (model_cards/tread_t2i_lora.md): Diffusers' LoRA metadata, the widget images saved
    next to it, the loading code of the pipeline (load_lora_weights, or PEFT injection without a loader)."""
    from PIL import Image

    info = hub.LoraCardInfo(
        base_model="org/base", pipeline_class="StableDiffusion3Pipeline", transformer_class="SD3Transformer2DModel",
        family="sd3", rank=4, lora_alpha=8, target_modules=["to_q", "to_k"], repo_id="user/lora", prompt="a fox",
        routes='[{"start_layer_idx": 1}]', objective="flow matching", dataset="imgs", num_examples=10,
        resolution=512, steps=3, global_batch_size=4, batch_size_per_device=2, gradient_accumulation_steps=2,
        learning_rate=1e-4, lr_scheduler="constant", hardware="CPU", training_time="0.1 min", final_loss="0.1235",
        command=hub.launch_command("training/train_tread_t2i_lora.py", ["--hub_token=hf_SECRET"]),
    )  # fmt: skip
    hub.save_lora_model_card(tmp_path, info, [Image.new("RGB", (8, 8))] * 2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "image_0.png", "image_1.png"]
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/base" and card.data.library_name == "diffusers"
    assert card.data.tags == ["text-to-image", "diffusers-training", "diffusers", "lora", "tread", "sd3",
                              "template:sd-lora"]  # fmt: skip
    assert card.data.widget == [{"text": "a fox", "output": {"url": f"image_{i}.png"}} for i in range(2)]
    for expected in (
        "LoRA adapters (rank 4, alpha 8, on `to_q, to_k`)",
        'pipe.load_lora_weights("user/lora")',
        'image = pipe("a fox")',
        '| routes | `[{"start_layer_idx": 1}]` |',
        "| data | 10 image-caption pairs from `imgs`, 512 px |",
        "| steps | 3 at batch 4 (2 per device x 2 accumulation) |",
        "| learning rate | 0.0001 (constant) |",
        "| hardware, time | CPU, 0.1 min |",
        "--hub_token=<redacted>",
    ):
        assert expected in card.text, expected
    assert "hf_SECRET" not in card.text and "\n\n\n" not in card.text

    # A local base model is no Hub base_model; a pipeline without a LoRA loader gets the PEFT snippet; unknown
    # training values leave their rows out.
    bare = hub.render_lora_model_card(
        hub.LoraCardInfo(
            base_model=str(tmp_path), pipeline_class="PixArtSigmaPipeline", transformer_class="PixArtTransformer2DModel",
            family="pixart", rank=2, lora_alpha=2, target_modules=["to_q"], repo_id="out", diffusers_loader=False,
        )
    )  # fmt: skip
    assert bare.data.base_model is None and bare.data.widget == [] and "pixart" in bare.data.tags
    assert "load_lora_weights" not in bare.text
    assert "config = LoraConfig(r=2, lora_alpha=2, target_modules=['to_q'])" in bare.text
    assert 'image = pipe("a photo")' in bare.text and "None" not in bare.text and "## Training" not in bare.text


# --- remote code in a fresh interpreter without diffusers_tread ---------------------------------------------------------


def _load_without_the_package(repo_dir: str, out_file: str, kinds: list[str]) -> None:
    """Runs in a fresh `python -I` (see below): diffusers_tread cannot be imported, and a simulated Hub serves
    `repo_dir` as org/tread-tiny, so the whole download path of `DiffusionPipeline.from_pretrained` runs."""
    import importlib.abc
    import json
    import shutil
    import sys
    import types
    from pathlib import Path

    blocked = []

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "diffusers_tread":
                blocked.append(name)
                raise ModuleNotFoundError(f"{name} is blocked in this test", name=name)
            return None

    sys.meta_path.insert(0, BlockPackage())
    try:
        import diffusers_tread  # noqa: F401
    except ImportError:
        blocked.clear()
    else:
        raise AssertionError("diffusers_tread is still importable")

    import diffusers.pipelines.pipeline_utils as pipeline_utils
    import diffusers.utils.dynamic_modules_utils as dynamic_modules_utils
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import EntryNotFoundError

    repos = {"org/tread-tiny": Path(repo_dir)}
    cache = Path(out_file).parent / "hub-cache"
    downloads = []

    def model_info(repo_id, **kwargs):
        files = [p.relative_to(repos[repo_id]).as_posix() for p in repos[repo_id].rglob("*") if p.is_file()]
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in files], sha="0" * 40)

    def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
        relative = f"{subfolder}/{filename}" if subfolder else filename
        downloads.append(relative)
        if not (repos[repo_id] / relative).is_file():
            raise EntryNotFoundError(f"{relative} not in {repo_id}")
        (cache / repo_id / relative).parent.mkdir(parents=True, exist_ok=True)
        return shutil.copy(repos[repo_id] / relative, cache / repo_id / relative)

    def snapshot_download(repo_id, **kwargs):
        downloads.append("<snapshot>")
        return str(shutil.copytree(repos[repo_id], cache / repo_id, dirs_exist_ok=True))

    for module in (pipeline_utils, dynamic_modules_utils):  # the download functions each module imported
        module.model_info, module.hf_hub_download = model_info, hf_hub_download
    pipeline_utils.snapshot_download = snapshot_download

    try:
        DiffusionPipeline.from_pretrained("org/tread-tiny")
        refused = False
    except ValueError as error:
        refused = "trust_remote_code=True" in str(error)
    pipe = DiffusionPipeline.from_pretrained("org/tread-tiny", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for kind in kinds:
        images[kind] = pipe(
            ["goldfish", 3],
            guidance_scale=3.0,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **({} if kind == "default" else {"guidance": kind}),
        ).images
    np.savez(f"{out_file}.npz", **images)
    report = {
        "refused_without_trust_remote_code": refused,
        "pipeline": f"{type(pipe).__module__}.{type(pipe).__name__}",
        "transformer": f"{type(pipe.transformer).__module__}.{type(pipe.transformer).__name__}",
        "same_transformer_class": type(pipe.transformer) is sys.modules[type(pipe).__module__].TreadTransformer2DModel,
        "labels": pipe.labels,
        "package_modules": sorted(name for name in sys.modules if name.split(".")[0] == "diffusers_tread"),
        "blocked_imports": list(blocked),
        "downloads": downloads,
    }

    # Control: a bundle that imports the package fails here, so the checks above would catch one.
    tampered = Path(out_file).parent / "tampered"
    shutil.copytree(repo_dir, tampered)
    for path in (tampered / "tread_dit.py", tampered / "transformer" / "tread_dit.py"):
        path.write_text(path.read_text() + "\nimport diffusers_tread  # needs the package after all\n")
    repos["org/tampered"] = tampered
    try:
        DiffusionPipeline.from_pretrained("org/tampered", trust_remote_code=True)
        report["tampered"] = "loaded"
    except ImportError as error:
        report["tampered"] = f"{type(error).__name__}: {error}"
    Path(out_file).write_text(json.dumps(report))


def test_remote_code_runs_with_plain_diffusers_in_a_fresh_interpreter(output_folder, tmp_path):
    repo = hub.prepare_hub_folder(output_folder, tmp_path / "repo", repo_id="org/tread-tiny")
    expected_pipe = TreadDiTPipeline.from_pretrained(output_folder)
    expected_pipe.set_progress_bar_config(disable=True)

    out_file = tmp_path / "child" / "report.json"
    out_file.parent.mkdir()
    code = textwrap.dedent(inspect.getsource(_load_without_the_package))
    code += f"\n_load_without_the_package({str(repo)!r}, {str(out_file)!r}, {GUIDANCE!r})\n"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),  # where Diffusers copies remote code to import it
    }
    # -I: no PYTHONPATH, no user site, not the working directory; the editable install's finder is blocked inside.
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(out_file.read_text())

    assert report["refused_without_trust_remote_code"]
    assert report["pipeline"] == "diffusers_modules.local.tread_dit.TreadDiTPipeline"
    assert report["transformer"] == "diffusers_modules.local.tread_dit.TreadTransformer2DModel"
    assert report["same_transformer_class"]  # the pipeline's isinstance checks see the loaded transformer
    assert report["package_modules"] == [] and report["blocked_imports"] == []
    assert {"model_index.json", "tread_dit.py"} <= set(report["downloads"])  # the code came from the (fake) Hub
    assert report["tampered"].startswith("ModuleNotFoundError") and "diffusers_tread" in report["tampered"]
    assert report["labels"] == expected_pipe.labels

    images = np.load(f"{out_file}.npz")
    for kind in GUIDANCE:
        expected = expected_pipe(
            ["goldfish", 3],
            guidance_scale=3.0,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **({} if kind == "default" else {"guidance": kind}),
        ).images
        np.testing.assert_allclose(images[kind], expected, atol=1e-6, err_msg=kind)


# --- Hub-ready folders and pushes ---------------------------------------------------------------------------------------


def test_hub_folder_adds_the_bundle_and_leaves_the_output_folder_alone(output_folder, tmp_path):
    before = folder_digest(output_folder)
    staged = hub.prepare_hub_folder(output_folder, tmp_path / "staged", repo_id="user/tread-tiny")
    assert folder_digest(output_folder) == before  # hard links are replaced, never written through

    files = set(folder_digest(staged))
    assert {"tread_dit.py", "transformer/tread_dit.py", "model_index.json", "README.md", hub.CARD_INFO_FILE} <= files
    assert "transformer/diffusion_pytorch_model.safetensors" in files and "samples/final_grid.png" in files
    assert not [f for f in files if f.startswith("checkpoint-") or f.endswith(".csv")]
    assert json.loads((staged / "model_index.json").read_text())["_class_name"] == ["tread_dit", "TreadDiTPipeline"]
    assert json.loads((staged / hub.CARD_INFO_FILE).read_text())["repo_id"] == "user/tread-tiny"
    card = ModelCard.load(staged / "README.md")
    assert card.data.datasets == ["org/tiny-data"]  # the folder card's metadata is kept
    # The output folder still loads with the installed package (library layout untouched).
    assert isinstance(TreadDiTPipeline.from_pretrained(output_folder).transformer, TreadTransformer2DModel)


def test_card_of_an_older_output_folder_keeps_its_training_table(tmp_path):
    folder = tmp_path / "old-run"
    tiny_pipeline().save_pretrained(folder)
    old_card = (
        "---\nlibrary_name: diffusers\nlicense: apache-2.0\ndatasets:\n- org/old-data\n---\n\n# old-run\n\n"
        '## Training\n\n| setting | value |\n|---|---|\n| objective | {"name": "flow"} |\n| steps | 3000 |\n\n'
        "Trained with:\n\n```bash\naccelerate launch training/train_tread.py\n```\n"
    )
    (folder / "README.md").write_text(old_card)  # written before tread_card.json existed
    staged = hub.prepare_hub_folder(folder, tmp_path / "staged", repo_id="user/old-run")
    card = ModelCard.load(staged / "README.md")
    assert '| objective | {"name": "flow"} |' in card.text and "| steps | 3000 |" in card.text
    assert "accelerate launch training/train_tread.py" in card.text and "trust_remote_code=True" in card.text
    assert "| backbone | DiT, 6 layers, width 16, patch 2" not in card.text  # the old table wins over configs
    assert card.data.datasets == ["org/old-data"] and "tread" in card.data.tags


class FakeHubApi:
    """Records create_repo / upload_folder / add_space_variable and what each upload would send; each upload
    returns a commit whose ``oid`` is ``COMMIT``."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"user/{repo_id}"})()

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        sent = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": sent}))
        return types.SimpleNamespace(oid=self.COMMIT)

    def add_space_variable(self, repo_id, key, value, **kwargs):
        self.calls.append(("add_space_variable", repo_id, {"key": key, "value": value, **kwargs}))

    def patch(self, monkeypatch):
        for name in ("create_repo", "upload_folder", "add_space_variable"):
            monkeypatch.setattr(hub.uploads, name, getattr(self, name))


def test_push_script_sends_card_bundle_and_demo_and_never_the_token(
    output_folder, tmp_path, monkeypatch, capsys, caplog
):
    api = FakeHubApi()
    api.patch(monkeypatch)
    (tmp_path / "fid.json").write_text(
        json.dumps([{"metric_type": "fid", "metric_value": 9.5, "dataset_type": "tiny", "dataset_name": "Tiny"}])
    )
    script = load_push_script()
    url = script.main(
        [
            str(output_folder),
            "--hub_model_id=tread-tiny",
            f"--hub_token={TOKEN}",
            "--space_id=tread-tiny-demo",
            f"--eval_results={tmp_path / 'fid.json'}",
        ]
    )
    assert url == "https://huggingface.co/user/tread-tiny"
    names = [(name, repo) for name, repo, _ in api.calls]
    assert names == [
        ("create_repo", "tread-tiny"),
        ("create_repo", "tread-tiny-demo"),
        ("upload_folder", "user/tread-tiny"),
        ("upload_folder", "user/tread-tiny-demo"),
        ("add_space_variable", "user/tread-tiny-demo"),
        ("add_space_variable", "user/tread-tiny-demo"),
    ]
    _, _, space_repo = api.calls[1]
    assert space_repo["repo_type"] == "space" and space_repo["space_sdk"] == "gradio"
    _, _, space = api.calls[3]
    assert space["repo_type"] == "space" and {"app.py", "requirements.txt", "README.md"} <= set(space["files"])
    assert SpaceCard(space["files"]["README.md"].decode()).data.models == ["user/tread-tiny"]
    variables = {call[2]["key"]: call[2]["value"] for call in api.calls[4:]}
    # the Space runs the model's remote code only at the commit just pushed
    assert variables == {"TREAD_MODEL": "user/tread-tiny", "TREAD_MODEL_REVISION": FakeHubApi.COMMIT}

    _, _, model = api.calls[2]
    files = model["files"]
    assert b"from .transformer.tread_dit import" in files["tread_dit.py"]
    assert b"class TreadTransformer2DModel(" in files["transformer/tread_dit.py"]
    assert json.loads(files["model_index.json"])["transformer"] == ["tread_dit", "TreadTransformer2DModel"]
    card = ModelCard(files["README.md"].decode())
    assert "https://huggingface.co/spaces/user/tread-tiny-demo" in card.text
    assert 'from_pretrained("user/tread-tiny", trust_remote_code=True)' in card.text
    assert card.data.eval_results[0].metric_value == 9.5 and card.data.datasets == ["org/tiny-data"]

    assert all(call[2].get("token") == TOKEN for call in api.calls)  # the token goes to huggingface_hub only
    for _, _, kwargs in api.calls:
        for name, data in kwargs.get("files", {}).items():
            assert TOKEN.encode() not in data, name
    for path in output_folder.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text


def test_push_script_turns_a_checkpoint_into_a_pipeline(output_folder, tmp_path):
    checkpoint = output_folder / "checkpoint-2"
    raw, averaged = (
        tiny_tread(seed=1, routes=ROUTES, num_embeds_ada_norm=4),
        tiny_tread(seed=2, routes=ROUTES, num_embeds_ada_norm=4),
    )
    raw.save_pretrained(checkpoint / "transformer")
    EMAModel(averaged.parameters(), model_cls=TreadTransformer2DModel, model_config=averaged.config).save_pretrained(
        checkpoint / "transformer_ema"
    )
    (output_folder / "samples" / "step_0000002.png").write_bytes(b"grid at step 2")

    script = load_push_script()
    staged = Path(script.main([str(checkpoint), "--hub_model_id=user/tread-tiny-2", f"--save_to={tmp_path / 'out'}"]))
    weights = load_file(staged / "transformer" / "diffusion_pytorch_model.safetensors")
    for name, tensor in averaged.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)  # the EMA weights
    index = json.loads((staged / "model_index.json").read_text())
    assert index["_class_name"] == ["tread_dit", "TreadDiTPipeline"] and index["id2label"]["2"] == "golden retriever"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and (staged / "transformer" / "tread_dit.py").is_file()
    card = ModelCard.load(staged / "README.md")
    assert "| steps | 2 |" in card.text and "| final training loss | 0.5000 |" in card.text
    assert "samples/step_0000002.png" in card.text and (staged / "samples" / "step_0000002.png").is_file()
    assert "# tread-tiny-2\n" in card.text and card.data.datasets == ["org/tiny-data"]

    orphan = tmp_path / "run" / "checkpoint-5"
    raw.save_pretrained(orphan / "transformer")
    with pytest.raises(ValueError, match="pass --objective"):
        script.main([str(orphan), "--hub_model_id=user/x", f"--save_to={tmp_path / 'orphan'}"])
    staged = Path(
        script.main([str(orphan), "--hub_model_id=user/x", "--objective=flow", f"--save_to={tmp_path / 'orphan'}"])
    )
    assert json.loads((staged / "model_index.json").read_text())["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert "| steps | 5 |" in (staged / "README.md").read_text()


def test_upload_output_uploads_the_bundle_with_the_final_folder(output_folder, monkeypatch):
    sent = []

    def fake_upload(**kwargs):
        folder = Path(kwargs["folder_path"])
        sent.append((folder, sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())))

    monkeypatch.setattr(hub.uploads, "upload_folder", fake_upload)
    hub.upload_output(output_folder / "checkpoint-2", "user/tread-tiny", "ckpt", TOKEN, path_in_repo="checkpoint-2")
    hub.upload_output(output_folder, "user/tread-tiny", "End of training", TOKEN)
    (checkpoint, checkpoint_files), (final, final_files) = sent
    assert checkpoint == output_folder / "checkpoint-2" and "tread_dit.py" not in checkpoint_files
    assert final.name == output_folder.name and final != output_folder and not final.exists()  # staged, then removed
    assert {"tread_dit.py", "transformer/tread_dit.py", "README.md"} <= set(final_files)
    assert json.loads((output_folder / "model_index.json").read_text())["_class_name"] == "TreadDiTPipeline"


@pytest.mark.parametrize("module", ["diffusers_tread.hub", "diffusers_tread.t2i_training"])
def test_hub_module_imports_no_training_or_demo_packages(module):
    code = (
        f"import sys, {module}; "
        "print([m for m in ('datasets', 'sklearn', 'matplotlib', 'gradio', 'selenium') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


def test_installed_package_loads_a_pushed_repo_with_its_own_classes(output_folder, tmp_path, fake_hub):
    repo = hub.prepare_hub_folder(output_folder, tmp_path / "repo", repo_id="org/tread-tiny")
    fake_hub.add("org/tread-tiny", repo)
    for source in ("org/tread-tiny", repo):
        pipe = TreadDiTPipeline.from_pretrained(source)
        assert type(pipe) is TreadDiTPipeline and type(pipe.transformer) is TreadTransformer2DModel
