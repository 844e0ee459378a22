"""diffusers_tread/compat.py and the Diffusers releases it serves: each shim, on the release installed and, where the
difference lies in an older release, with that release's call simulated. `.ci/run` runs this file on the floor
(0.35.2) and on the newest release."""

import importlib
import inspect
import json
import re
import shutil
import sys
import warnings

import diffusers
import pytest
import torch
from conftest import REPO, tiny_tread
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTTransformer2DModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.models import ModelMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from packaging.specifiers import SpecifierSet
from peft import LoraConfig

from diffusers_tread import TreadDiTPipeline, TreadTransformer2DModel, compat


def test_installed_diffusers_is_a_release_setup_py_allows():
    spec = re.search(r'"diffusers([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert diffusers.__version__ in SpecifierSet(spec), f"Diffusers {diffusers.__version__} is outside {spec}"
    assert SpecifierSet(spec).contains("0.35.2") and not SpecifierSet(spec).contains("0.34.0")
    # .ci/run's second leg tests the floor: a release setup.py allows, of the floor's minor release
    floor = re.search(r"^bash \.ci/diffusers-leg (\S+)$", (REPO / ".ci" / "run").read_text(), re.MULTILINE).group(1)
    assert floor in SpecifierSet(spec) and floor.split(".")[:2] == ["0", "35"]


def _config_mixin_with_dduf_entries(monkeypatch):
    """`ConfigMixin._dict_from_json_file` as Diffusers 0.33-0.40 define it (``load_config`` passes ``dduf_entries=``)."""

    def dict_from_json_file(cls, json_file, dduf_entries=None):
        assert dduf_entries is None
        with open(json_file, encoding="utf-8") as reader:
            return json.loads(reader.read())

    monkeypatch.setattr(ConfigMixin, "_dict_from_json_file", classmethod(dict_from_json_file))


def test_model_index_override_takes_the_dduf_entries_of_0_33_to_0_40(tmp_path, monkeypatch):
    index = {"_class_name": ["tread_dit", "TreadDiTPipeline"], "transformer": ["tread_dit", "TreadTransformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    _config_mixin_with_dduf_entries(monkeypatch)
    config = TreadDiTPipeline._dict_from_json_file(tmp_path / "model_index.json", dduf_entries=None)
    assert config == {"_class_name": "TreadDiTPipeline", "transformer": ["diffusers_tread", "TreadTransformer2DModel"]}

    # The committed remote-code copy carries the same override, and reads the file unchanged. Its root file imports
    # its models from `.transformer.tread_dit`, so it is imported as a package, as Diffusers' module loader does.
    package = tmp_path / "tread_dit_bundle"
    shutil.copytree(REPO / "pipelines" / "tread_dit", package, ignore=shutil.ignore_patterns("*.md"))
    for folder in (package, package / "transformer"):
        (folder / "__init__.py").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        bundle = importlib.import_module("tread_dit_bundle.tread_dit")
        assert bundle.TreadDiTPipeline._dict_from_json_file(tmp_path / "model_index.json", dduf_entries=None) == index
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "tread_dit_bundle"]:
            del sys.modules[name]


def test_pipeline_signature_types_resolve_the_init_annotations():
    expected = {
        "transformer": (DiTTransformer2DModel, ModelMixin),
        "vae": (AutoencoderKL, type(None)),
        "scheduler": (KarrasDiffusionSchedulers,),
        "id2label": (dict[int, str], dict[str, str], type(None)),
    }
    assert compat.pipeline_signature_types(TreadDiTPipeline) == expected
    # What from_pretrained looks every component and config entry up in, on every release.
    assert TreadDiTPipeline._get_signature_types() == expected
    if compat.RESOLVES_PIPELINE_ANNOTATIONS:  # 0.37 onward: the release's own rule, which the shim copies
        assert DiffusionPipeline._get_signature_types.__func__(TreadDiTPipeline) == expected
    else:
        assert "_get_signature_types" in vars(TreadDiTPipeline)


def test_pipeline_signature_types_of_an_unannotated_parameter():
    class Pipeline(DiffusionPipeline):
        def __init__(self, unet, scheduler: KarrasDiffusionSchedulers | None = None):
            super().__init__()

    assert compat.pipeline_signature_types(Pipeline) == {
        "unet": (inspect.Signature.empty,),
        "scheduler": (KarrasDiffusionSchedulers, type(None)),
    }


def _save_lora(folder, safe_serialization=True):
    model = tiny_tread()
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q"]))
    model.save_lora_adapter(folder, safe_serialization=safe_serialization)
    return model


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_lora_file_of_a_local_folder_is_found_offline(tmp_path, monkeypatch, safe_serialization):
    """Diffusers 0.35-0.39 refuse to look for the file in a local folder when offline; the wrapper names it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _save_lora(tmp_path, safe_serialization=safe_serialization)
    hub_kwargs = dict(cache_dir=None, proxies=None, token=None, revision=None, subfolder=None, force_download=False)
    state_dict, metadata = compat.fetch_lora_state_dict(
        tmp_path,
        weight_name=None,
        use_safetensors=True,
        allow_pickle=True,
        local_files_only=True,
        user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
        **hub_kwargs,
    )
    assert len(state_dict) == 12 and all(isinstance(value, torch.Tensor) for value in state_dict.values())
    if safe_serialization:  # the adapter's LoraConfig travels in the safetensors header only
        assert metadata["r"] == 4 and metadata["lora_alpha"] == 8
    else:
        assert metadata is None


def test_fetch_lora_state_dict_names_a_release_without_the_reader(monkeypatch):
    from diffusers.loaders import lora_base

    monkeypatch.delattr(lora_base, "_fetch_state_dict")
    with pytest.raises(ImportError, match="supported release"):
        compat.fetch_lora_state_dict({})


def test_dtype_kwarg_is_the_one_the_release_reads_without_a_warning(tmp_path):
    TreadDiTPipeline(transformer=tiny_tread(), vae=None, scheduler=DDIMScheduler()).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a pipeline's torch_dtype= is deprecated from 0.40
        pipe = TreadDiTPipeline.from_pretrained(tmp_path, **compat.dtype_kwarg(torch.float64))
        model = TreadTransformer2DModel.from_pretrained(tmp_path / "transformer", **compat.dtype_kwarg(torch.float64))
    assert {parameter.dtype for parameter in [*pipe.transformer.parameters(), *model.parameters()]} == {torch.float64}


def test_a_family_the_release_lacks_is_none_and_refused_with_a_message():
    assert compat.diffusers_class("DiTPipeline") is diffusers.DiTPipeline
    assert compat.diffusers_class("Flux9Transformer2DModel") is None  # a family of a future release
    from diffusers_tread.t2i_training import ModelSpec

    index = {"_class_name": "Flux9Pipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    with pytest.raises(ValueError, match="unknown pipeline class 'Flux9Pipeline'.*a newer release may have it"):
        ModelSpec("base", index)
