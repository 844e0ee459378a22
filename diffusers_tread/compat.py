"""Diffusers releases: the private API this package touches, and the releases each use of it serves.

setup.py allows Diffusers 0.35 up to the next minor release (0.43); `.ci/run` tests the floor (0.35.2) and the
newest release. Public API is used wherever one exists; what follows has none. Read from the released wheels.

- ``models.attention.AttentionMixin`` (the DiT model's attention-processor API): 0.35 onward, hence the floor.
  Imported where used (`models/transformer_tread.py`).
- ``DiffusionPipeline._get_signature_types`` reads ``__init__`` annotations unresolved on 0.35-0.36: string
  annotations (``from __future__ import annotations``) and ``X | Y`` unions leave parameters out, and
  ``from_pretrained`` raises ``KeyError``. 0.37 onward resolve them. `pipeline_signature_types` is that rule;
  `TreadDiTPipeline` uses it where the release lacks it (`RESOLVES_PIPELINE_ANNOTATIONS`).
- ``ConfigMixin._dict_from_json_file``: ``load_config`` passes ``dduf_entries=`` on 0.33-0.40 and nothing from 0.41;
  `TreadDiTPipeline`'s override takes ``**kwargs`` and forwards them, which serves both.
- ``loaders.lora_base._fetch_state_dict`` (the pipelines' LoRA file reader, safetensors first): returns
  ``(state_dict, metadata)`` from 0.34; 0.40 adds ``return_file_metadata`` (a third value, off by default).
  `fetch_lora_state_dict` wraps it. On 0.35-0.39 it also refuses to look for the file in a local folder when offline
  (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) unless ``weight_name`` is given; 0.40 onward look, and the
  wrapper names Diffusers' standard LoRA file there for the older releases.
- ``from_pretrained(dtype=)``: 0.40 onward; ``torch_dtype=`` is read by every release and deprecated from 0.40.
  `dtype_kwarg` gives the one the release reads without a warning (public API, renamed).
- LoRA metadata arguments (``save_lora_weights(transformer_lora_adapter_metadata=)``,
  ``write_lora_layers(lora_adapter_metadata=)``, ``load_lora_adapter(metadata=)``): 0.34 onward; used directly.
- ``pipelines.pipeline_loading_utils.LOADABLE_CLASSES`` (the loader's registry of component libraries): every
  release 0.30-0.42; `register_loadable_library`.
- ``ModelMixin._gradient_checkpointing_func``: 0.33 onward; used directly (`models/`).
- Flux's single-stream blocks taking separate image and text streams: 0.35 onward; the router relies on it.
- Model families arrive in later releases (e.g. Flux.2, Z-Image from 0.36): `diffusers_class` returns ``None`` for one
  the installed release lacks, so callers refuse it with a message and tests skip it.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from typing import Any

import diffusers
import torch
from packaging.version import Version

DIFFUSERS_RELEASE = Version(diffusers.__version__).release
# DiffusionPipeline._get_signature_types resolves string annotations and `X | Y` unions (0.37 onward).
RESOLVES_PIPELINE_ANNOTATIONS = DIFFUSERS_RELEASE >= (0, 37)


def diffusers_class(name: str) -> type | None:
    """``diffusers.<name>`` (a pipeline or model class), or ``None`` where the installed release lacks it."""
    try:
        return getattr(diffusers, name)
    except (
        AttributeError,
        ImportError,
        RuntimeError,
    ):  # lazy modules raise ImportError/RuntimeError on a failed import
        return None


def dtype_kwarg(dtype: torch.dtype | None) -> dict[str, torch.dtype | None]:
    """The ``from_pretrained`` keyword for a weight dtype: ``dtype=`` from Diffusers 0.40, ``torch_dtype=`` before."""
    return {"dtype" if DIFFUSERS_RELEASE >= (0, 40) else "torch_dtype": dtype}


def pipeline_signature_types(pipeline_class: type) -> dict[str, tuple[Any, ...]]:
    """``{parameter: accepted types}`` of a pipeline's ``__init__``, as ``DiffusionPipeline._get_signature_types``
    returns it from 0.37 on: annotations resolved, a union split into its members, ``inspect.Signature.empty``
    where a parameter has no annotation. Diffusers type-checks (and only warns about) components with it."""
    hints = typing.get_type_hints(pipeline_class.__init__)
    signature_types = {}
    for name in list(inspect.signature(pipeline_class.__init__).parameters)[1:]:  # without `self`
        hint = hints.get(name, inspect.Signature.empty)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            signature_types[name] = typing.get_args(hint)
        else:
            signature_types[name] = (hint,)
    return signature_types


def fetch_lora_state_dict(pretrained_model_name_or_path_or_dict: Any, **kwargs: Any) -> tuple[dict, dict | None]:
    """``(state_dict, metadata)`` of a LoRA file (a folder, Hub id or state dict) by Diffusers' own reader
    (``lora_base._fetch_state_dict``; ``kwargs`` are its arguments); ``metadata`` is the adapter's ``LoraConfig``
    from the safetensors header, or ``None``."""
    from diffusers.loaders import lora_base

    fetch = getattr(lora_base, "_fetch_state_dict", None)
    if fetch is None:
        raise ImportError(
            f"Diffusers {diffusers.__version__} has no `loaders.lora_base._fetch_state_dict`, which LoRA loading "
            "uses; install a supported release (see setup.py)."
        )
    folder = pretrained_model_name_or_path_or_dict
    if DIFFUSERS_RELEASE < (0, 40) and kwargs.get("weight_name") is None and not isinstance(folder, dict):
        if os.path.isdir(folder):  # 0.35-0.39 raise offline here; pick the file as 0.40's lookup would
            names = [lora_base.LORA_WEIGHT_NAME_SAFE] if kwargs.get("use_safetensors") is not False else []
            names += [lora_base.LORA_WEIGHT_NAME] if kwargs.get("allow_pickle") else []
            kwargs["weight_name"] = next((name for name in names if os.path.isfile(os.path.join(folder, name))), None)
    state_dict, metadata = fetch(
        pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict, **kwargs
    )[:2]
    return state_dict, metadata


def register_loadable_library(library: str) -> None:
    """Tell Diffusers' pipeline loader that ``library`` holds ``ModelMixin`` components (saved and loaded with
    ``save_pretrained`` / ``from_pretrained``), so it downloads and resolves them; the dict is Diffusers' own."""
    from diffusers.pipelines import pipeline_loading_utils

    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(library, {"ModelMixin": ["save_pretrained", "from_pretrained"]})
