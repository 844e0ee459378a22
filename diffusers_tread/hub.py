"""Hugging Face Hub integration: model cards, remote-code bundles, and pushing output folders and demo Spaces.

A folder written by ``TreadDiTPipeline.save_pretrained`` (or by ``training/train_tread.py``) records its transformer as
``["diffusers_tread", "TreadTransformer2DModel"]``, which only loads where ``diffusers_tread`` is installed. For the
Hub, `prepare_hub_folder` adds a *remote-code bundle*: standalone modules generated from this package's own sources
(`generate_module` inlines a module and the package modules it imports, relative imports resolved) and a
``model_index.json`` that points at them, so that plain Diffusers runs the checkpoint::

    pipe = DiffusionPipeline.from_pretrained("user/repo", trust_remote_code=True)

Nothing here imports training-only packages (datasets, scikit-learn, matplotlib, gradio).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from huggingface_hub import (
    EvalResult,
    ModelCard,
    ModelCardData,
    SpaceCard,
    add_space_variable,
    create_repo,
    model_info,
    upload_folder,
)

from .checkpointing import STAGING_PATTERNS
from .models import TreadSSM2DModel, model_class_for_config

logger = logging.getLogger(__name__)

PACKAGE = "diffusers_tread"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def _shipped_folder(name: str) -> Path:
    """``model_cards`` or ``spaces``: top-level folders of a checkout, installed with the wheel as the data packages
    ``diffusers_tread._model_cards`` / ``diffusers_tread._spaces`` (setup.py's ``package_dir``)."""
    spec = importlib.util.find_spec(f"{PACKAGE}._{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return REPO_ROOT / name  # a source checkout on sys.path, not installed


MODEL_CARD_TEMPLATE = _shipped_folder("model_cards") / "tread_dit.md"
LORA_MODEL_CARD_TEMPLATE = _shipped_folder("model_cards") / "tread_t2i_lora.md"
SPACE_DIR = _shipped_folder("spaces") / "tread-dit"
CARD_INFO_FILE = "tread_card.json"
# What never goes to the Hub from an output folder (both training scripts' list): checkpoints, complete or left half
# written by a kill, per-step samples and validations, tracker logs, the loss history.
HUB_IGNORE_PATTERNS = [
    "checkpoint-*",
    "step_*",
    "epoch_*",
    "validation/step_*",
    "logs/*",
    "*.csv",
    *STAGING_PATTERNS,  # staging folders, temporary files and the run's lock (diffusers_tread.checkpointing)
]

# The remote-code bundle is one module, generated from the pipeline's source (which imports the transformer, which
# imports the router), stored twice: `tread_dit.py` at the repo root for the pipeline (model_index.json
# `"_class_name": ["tread_dit", "TreadDiTPipeline"]`) and `transformer/tread_dit.py` for the component
# (`"transformer": ["tread_dit", "TreadTransformer2DModel"]`). Diffusers loads both under the same module name
# (`diffusers_modules.local.tread_dit`), so the pipeline's `TreadTransformer2DModel` is the transformer's class and
# the pipeline's isinstance checks (e.g. for Sparse Guidance) hold; two module names would give two unrelated classes.
REMOTE_MODULE = "tread_dit"
REMOTE_SOURCE = f"{PACKAGE}.pipelines.pipeline_tread_dit"
REMOTE_PIPELINE_CLASS = "TreadDiTPipeline"
REMOTE_COMPONENT_CLASSES = ("TreadTransformer2DModel", "TreadSSM2DModel")  # the pipeline's source imports both

# The Hub has no class-conditional task; class-conditional DiT checkpoints are image generators without a prompt or
# an input image, which is the Hub's "unconditional-image-generation" task.
PIPELINE_TAG = "unconditional-image-generation"
TAGS = ["tread", "diffusers-tread", "diffusers", "dit", "class-conditional", "image-generation"]
# A text-to-image LoRA's card: the tags Diffusers' LoRA training scripts give theirs (`populate_model_card`), TREAD's,
# and the model family (pixart, sd3, flux) before "template:sd-lora".
LORA_TAGS = ["text-to-image", "diffusers-training", "diffusers", "lora", "tread"]

# The patterns Diffusers' dynamic-module loader uses to find imports (utils/dynamic_modules_utils.py): it imports every
# top-level module named this way, so no line of a bundle may name this package like that, not even in a docstring.
_IMPORT_LINE = re.compile(r"^\s*(?:import\s+(\S+)\s*$|from\s+(\S+)\s+import)", flags=re.MULTILINE)


# ----------------------------------------------------------------------------------------------------------------------
# Remote-code bundles: standalone modules generated from the package sources
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    name: str  # dotted module name, e.g. "diffusers_tread.routing"
    path: Path
    text: str
    tree: ast.Module


def _module_path(module: str) -> Path:
    """The source file of a module of this package (a plain module, not a package ``__init__``)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(f"{module} is not a module of {PACKAGE}.")
    path = PACKAGE_DIR.joinpath(*parts[1:]).with_suffix(".py")
    if not path.is_file():
        raise ValueError(
            f"{module} is not a module file of {PACKAGE} (a package `__init__` cannot be inlined): import names from "
            "the module that defines them."
        )
    return path


def _read(module: str) -> _Source:
    path = _module_path(module)
    text = path.read_text(encoding="utf-8")
    return _Source(module, path, text, ast.parse(text, filename=str(path)))


def _resolve_import(source: _Source, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` written in ``source``."""
    if node.level == 0:
        return node.module
    package = source.name.split(".")[: -node.level]
    return ".".join(package + ([node.module] if node.module else []))


def _is_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == PACKAGE and PACKAGE_DIR.joinpath(*parts[1:]).with_suffix(".py").is_file()


def _package_imports(source: _Source) -> list[tuple[ast.stmt, str, str | None, str]]:
    """This package's imports in ``source``: ``(node, module, attribute or None for a module, bound name)``.

    Only top-level imports can be inlined; one inside a function or a ``try`` raises.
    """
    found = []
    top_level = set(map(id, source.tree.body))
    for node in ast.walk(source.tree):
        if isinstance(node, ast.ImportFrom):
            module = _resolve_import(source, node)
            if module.split(".")[0] != PACKAGE:
                continue
            entries = []
            for alias in node.names:
                if _is_module(f"{module}.{alias.name}"):
                    entries.append((f"{module}.{alias.name}", None, alias.asname or alias.name))
                else:
                    if alias.asname not in (None, alias.name):
                        raise ValueError(f"{source.path}: `import {alias.name} as {alias.asname}` cannot be inlined.")
                    entries.append((module, alias.name, alias.name))
        elif isinstance(node, ast.Import):
            entries = []
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    if not alias.asname:
                        raise ValueError(f"{source.path}: use `import {alias.name} as name` or `from ... import`.")
                    entries.append((alias.name, None, alias.asname))
        else:
            continue
        if entries and id(node) not in top_level:
            raise ValueError(f"{source.path}:{node.lineno}: only top-level imports of {PACKAGE} can be inlined.")
        found.extend((node, module, attribute, bound) for module, attribute, bound in entries)
    return found


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _external_imports(source: _Source) -> list[tuple[ast.stmt, list[tuple[str, str | None, str]]]]:
    """Top-level imports of other packages: ``(node, [(module, attribute or None, bound name)])``."""
    imports = []
    for node in source.tree.body:
        if isinstance(node, ast.Import) and node.names[0].name.split(".")[0] != PACKAGE:
            imports.append((node, [(a.name, None, a.asname or a.name.split(".")[0]) for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] != PACKAGE:
            imports.append((node, [(node.module, a.name, a.asname or a.name) for a in node.names]))
    return imports


def _same_object(first: tuple[str, str | None], second: tuple[str, str | None]) -> bool:
    """Whether two imports bind the same object (e.g. a class imported from a package and from its module)."""
    if first == second:
        return True
    objects = []
    for module, attribute in (first, second):
        imported = importlib.import_module(module)
        objects.append(imported if attribute is None else getattr(imported, attribute, None))
    return objects[0] is objects[1] and objects[0] is not None


def _byte_offset(line_starts: list[int], lineno: int, col: int) -> int:
    return line_starts[lineno - 1] + col


def _module_body(source: _Source, namespaces: set[str], removed: set[int]) -> str:
    """``source`` without its docstring and top-level imports, ``namespace.attr`` rewritten to ``attr``."""
    data = source.text.encode("utf-8")  # ast column offsets count UTF-8 bytes
    line_starts = [0]
    for line in data.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    edits = []  # (start, end, replacement)
    body = source.tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            edits.append((line_starts[body[0].lineno - 1], line_starts[body[0].end_lineno], b""))
    for node in body:
        if id(node) in removed:
            edits.append((line_starts[node.lineno - 1], line_starts[node.end_lineno], b""))

    parents = {id(child): node for node in ast.walk(source.tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(source.tree):
        if not (isinstance(node, ast.Name) and node.id in namespaces):
            continue
        parent = parents.get(id(node))
        if not (isinstance(parent, ast.Attribute) and parent.value is node and isinstance(node.ctx, ast.Load)):
            raise ValueError(
                f"{source.path}:{node.lineno}: the module `{node.id}` is used other than as `{node.id}.name`, which "
                "cannot be inlined."
            )
        start = _byte_offset(line_starts, node.lineno, node.col_offset)
        end = _byte_offset(line_starts, parent.end_lineno, parent.end_col_offset)
        edits.append((start, end, parent.attr.encode()))

    for start, end, replacement in sorted(edits, reverse=True):
        data = data[:start] + replacement + data[end:]
    text = data.decode("utf-8")
    return re.sub(r"\n{3,}", "\n\n\n", text).strip("\n")


def _comment(text: str) -> str:
    return "\n".join(f"# {line}".rstrip() for line in text.strip().splitlines())


def _import_lines(bindings: dict[str, tuple[str, str | None]]) -> list[str]:
    """Merged import statements: ``from __future__`` first, then the standard library, then other packages."""
    plain, members = set(), {}
    for bound, (module, attribute) in bindings.items():
        if attribute is None:
            plain.add(f"import {module}" if bound == module.split(".")[0] else f"import {module} as {bound}")
        else:
            members.setdefault(module, set()).add(attribute if bound == attribute else f"{attribute} as {bound}")
    statements = [(module, line) for line in plain for module in [line.split()[1]]]
    statements += [(module, f"from {module} import {', '.join(sorted(names))}") for module, names in members.items()]

    def group(module: str) -> int:
        top = module.split(".")[0]
        return 0 if top == "__future__" else 1 if top in sys.stdlib_module_names else 2

    lines, previous = [], None
    # isort's order: sections, then plain imports before `from` imports, then by module
    for module, line in sorted(statements, key=lambda item: (group(item[0]), item[1].startswith("from"), item)):
        if previous is not None and group(module) != previous:
            lines.append("")
        lines.append(line)
        previous = group(module)
    return lines


def generate_module(module: str) -> str:
    """Generate a standalone module from ``module`` of this package (e.g. ``"diffusers_tread.routing"``).

    The module and every package module it imports (recursively) are inlined in dependency order: their top-level
    imports of other packages are merged at the top; their imports of this package are dropped, and a module imported
    as a namespace (``from .. import routing``) has its ``routing.name`` uses rewritten to ``name``. Two inlined
    modules defining the same name, or an import this cannot resolve, raise a ``ValueError``; so does output that
    would still import this package. The result needs only the packages the sources import (torch, diffusers).
    """
    from . import __version__

    order: list[_Source] = []
    seen: dict[str, _Source] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ValueError(f"Import cycle: {' -> '.join((*chain, name))}.")
        if name in seen:
            return
        source = _read(name)
        seen[name] = source
        for _, imported, _, _ in _package_imports(source):
            visit(imported, (*chain, name))
        order.append(source)

    visit(module, ())

    bindings: dict[str, tuple[str, str | None]] = {}
    defined: dict[str, str] = {}
    for source in order:
        for name in _defined_names(source.tree):
            if name in defined:
                raise ValueError(f"`{name}` is defined in both {defined[name]} and {source.name}; rename one.")
            defined[name] = source.name
    sections = []
    for source in order:
        removed, namespaces = set(), set()
        for node, imported, attribute, bound in _package_imports(source):
            removed.add(id(node))
            if attribute is None:
                namespaces.add(bound)
            elif defined.get(attribute) != imported:
                raise ValueError(f"{source.path}: `{attribute}` is not defined at the top level of {imported}.")
        for node, entries in _external_imports(source):
            removed.add(id(node))
            for imported, attribute, bound in entries:
                if not _same_object(bindings.setdefault(bound, (imported, attribute)), (imported, attribute)):
                    raise ValueError(f"{source.path}: `{bound}` is imported differently in two inlined modules.")
                if bound in defined:
                    raise ValueError(f"{source.path}: `{bound}` is both imported and defined by inlined modules.")
        for namespace in namespaces:
            if namespace in defined or namespace in bindings:
                raise ValueError(f"{source.path}: the module name `{namespace}` clashes with an inlined name.")
        docstring = ast.get_docstring(source.tree, clean=False)
        relative = source.path.relative_to(PACKAGE_DIR.parent).as_posix()
        header = f"# {'-' * 40} {relative}"
        if source is not order[-1] and docstring:
            header += "\n#\n" + _comment(docstring)
        sections.append(header + "\n\n" + _module_body(source, namespaces, removed))

    root = order[-1]
    origin = ", ".join(source.path.relative_to(PACKAGE_DIR.parent).as_posix() for source in order)
    docstring = ast.get_docstring(root.tree, clean=False) or ""
    if '"""' in docstring or docstring.endswith('"'):
        raise ValueError(f"{root.path}: the module docstring cannot be re-quoted.")
    text = "\n".join(
        [
            f"# Generated by {PACKAGE}.hub.generate_module({module!r}) from {PACKAGE} {__version__}: do not edit;",
            "# regenerate from the library instead. Inlined sources, in order:",
            f"# {origin}.",
            ("r" if "\\" in docstring else "") + '"""' + docstring + '"""',
            "",
            "\n".join(_import_lines(bindings)),
            "",
            "",
            "\n\n\n".join(sections),
            "",
        ]
    )
    compile(text, f"<{module} bundle>", "exec")
    for match in _IMPORT_LINE.finditer(text):
        named = (match.group(1) or match.group(2)).lstrip(".")
        if match.group(0).lstrip().startswith("from .") or named.split(".")[0] == PACKAGE:
            raise ValueError(f"The generated module still imports {match.group(0).strip()!r}.")
    return text


def remote_code_files(model_index: Mapping[str, Any]) -> dict[str, str]:
    """The bundle a pipeline folder with this ``model_index.json`` (library layout) needs: ``{repo path: source}``."""
    paths = [f"{REMOTE_MODULE}.py"] if _class_name(model_index) == REMOTE_PIPELINE_CLASS else []
    paths += [
        f"{component}/{REMOTE_MODULE}.py" for component, value in model_index.items() if _is_library_entry(value)
    ]
    if not paths:
        return {}
    text = generate_module(REMOTE_SOURCE)
    for class_name in (REMOTE_PIPELINE_CLASS, *REMOTE_COMPONENT_CLASSES):
        if not re.search(rf"^class {class_name}\b", text, flags=re.MULTILINE):
            raise ValueError(f"The generated {REMOTE_MODULE}.py does not define {class_name}.")
    return dict.fromkeys(paths, text)


def _class_name(model_index: Mapping[str, Any]) -> str:
    name = model_index.get("_class_name")
    return name[1] if isinstance(name, (list, tuple)) else name


def _is_library_entry(value: Any) -> bool:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == PACKAGE):
        return False
    if value[1] not in REMOTE_COMPONENT_CLASSES:
        raise ValueError(f"The remote-code bundle has no {PACKAGE}.{value[1]}.")
    return True


def remote_code_model_index(model_index: Mapping[str, Any]) -> dict[str, Any]:
    """``model_index.json`` of the library layout -> the remote-code layout (the pipeline class and this package's
    components point at the bundle module). Other entries are kept."""
    index = dict(model_index)
    if _class_name(index) == REMOTE_PIPELINE_CLASS:
        index["_class_name"] = [REMOTE_MODULE, REMOTE_PIPELINE_CLASS]
    for component, value in model_index.items():
        if _is_library_entry(value):
            index[component] = [REMOTE_MODULE, value[1]]
    return index


def library_model_index(model_index: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `remote_code_model_index`: entries that name the bundle name this package again."""
    index = dict(model_index)
    if list(index.get("_class_name") or []) == [REMOTE_MODULE, REMOTE_PIPELINE_CLASS]:
        index["_class_name"] = REMOTE_PIPELINE_CLASS
    for component, value in model_index.items():
        if component.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and list(value[:1]) == [REMOTE_MODULE] and len(value) == 2:
            index[component] = [PACKAGE, value[1]]
    return index


def is_remote_code_index(model_index: Mapping[str, Any]) -> bool:
    """Whether a ``model_index.json`` names the remote-code bundle (needs ``trust_remote_code=True`` to load)."""
    return library_model_index(model_index) != dict(model_index)


def write_remote_code(folder: str | os.PathLike) -> list[str]:
    """Add the remote-code bundle to a saved pipeline folder and point its ``model_index.json`` at it.

    Afterwards the folder loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` without
    this package. Returns the files written, relative to ``folder``.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = library_model_index(json.loads(index_path.read_text()))
    written = []
    for relative, text in remote_code_files(index).items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        _replace_file(folder / relative, text)
        written.append(relative)
    _replace_file(index_path, json.dumps(remote_code_model_index(index), indent=2, sort_keys=True) + "\n")
    return [*written, "model_index.json"]


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as a new file, never through a hard link to an original (`prepare_hub_folder`)."""
    path.unlink(missing_ok=True)
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelCardInfo:
    """What a TREAD model card says beyond its Hub metadata: the training setup and how to use the model.

    Every field is optional; a table row or section whose value is None is left out. Saved next to the card as
    ``tread_card.json`` so the card can be rendered again (e.g. by `push_to_hub` with a repo id and demo link).
    """

    model_name: str
    repo_id: str | None = None
    demo_url: str | None = None
    # the model
    backbone: str | None = None
    model_class: str = "TreadTransformer2DModel"  # or "TreadSSM2DModel"
    num_parameters: str | None = None
    num_tokens: int | None = None
    routes: str | None = None
    route_reinsertion: str | None = None
    disable_routing_after_step: int | str | None = None
    # the training
    objective: str | None = None
    tread_loss: str | None = None
    dataset: str | None = None
    num_examples: int | None = None
    num_classes: int | None = None
    data_space: str | None = None
    steps: int | None = None
    global_batch_size: int | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    ema: str | None = None
    mixed_precision: str | None = None
    hardware: str | None = None
    training_time: str | None = None
    final_loss: str | None = None
    command: str | None = None
    training_table: list[list[str]] | None = None  # rows as given, instead of the fields above (an older card's)
    # the samples and usage
    grid: str | None = "samples/final_grid.png"
    loss_plot: str | None = "samples/loss.png"
    example_labels: list | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 4.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelCardInfo:
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in json.loads(text).items() if key in fields})


def fid_result(
    value: float,
    dataset_type: str = "imagenet-1k",
    dataset_name: str = "ImageNet 256x256",
    dataset_split: str | None = "train",
    metric_name: str | None = None,
    **kwargs,
) -> EvalResult:
    """An FID ``EvalResult`` for the card's ``model-index`` (e.g. ``metric_name="FID-50K, cfg 1.5, 250 steps"``)."""
    return EvalResult(
        task_type=PIPELINE_TAG,
        task_name="Class-conditional image generation",
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        metric_type="fid",
        metric_name=metric_name or "FID",
        metric_value=value,
        **kwargs,
    )


def card_metadata(
    info: ModelCardInfo,
    card_data: ModelCardData | None = None,
    eval_results: Sequence[EvalResult] | None = None,
) -> ModelCardData:
    """Hub metadata: ``card_data``'s fields (license, base_model, datasets, ...) and ``eval_results`` (else
    ``card_data``'s) plus what every TREAD card has: library_name ``diffusers``, the TREAD tags, the pipeline tag,
    and the model name the ``model-index`` of the eval results needs."""
    data = card_data.to_dict() if card_data is not None else {}
    data.pop("model-index", None)
    model_name = data.pop("model_name", None) or (card_data.model_name if card_data is not None else None)
    if eval_results is None and card_data is not None:
        eval_results = card_data.eval_results
    data.update(
        library_name="diffusers",
        license=data.get("license") or "apache-2.0",
        pipeline_tag=data.get("pipeline_tag") or PIPELINE_TAG,
        tags=list(dict.fromkeys([*TAGS, *(data.get("tags") or [])])),
    )
    if not eval_results:  # model_name only names the model-index entry
        return ModelCardData(**data)
    return ModelCardData(eval_results=list(eval_results), model_name=model_name or info.model_name, **data)


def _joined(*parts: Any, separator: str = ", ") -> str | None:
    return separator.join(str(part) for part in parts if part is not None and part != "") or None


def training_rows(info: ModelCardInfo) -> list[tuple[str, str]]:
    """The rows of the card's training table, leaving out what is unknown."""
    if info.training_table:
        return [(str(name), str(value)) for name, value in info.training_table]
    backbone = info.backbone
    details = _joined(
        f"{info.num_parameters} parameters" if info.num_parameters else None,
        f"{info.num_tokens} tokens per image" if info.num_tokens else None,
    )
    if backbone and details:
        backbone = f"{backbone} ({details})"
    routes = info.routes and _joined(
        f"`{info.routes}`",
        f"({info.route_reinsertion} re-insertion)" if info.route_reinsertion else None,
        separator=" ",
    )
    data = info.dataset
    details = _joined(
        f"{info.num_examples} examples" if info.num_examples is not None else None,
        f"{info.num_classes} classes" if info.num_classes is not None else None,
        info.data_space,
    )
    if data and details:
        data = f"{data} ({details})"
    optimizer = None
    if info.learning_rate is not None:
        optimizer = _joined(
            f"AdamW, learning rate {info.learning_rate}",
            f"{info.lr_scheduler} schedule" if info.lr_scheduler else None,
        )
    rows = [
        ("backbone", backbone),
        ("routes", routes),
        ("routing disabled after step", info.disable_routing_after_step),
        ("objective", info.objective and f"`{info.objective}`"),
        ("TREAD loss", info.tread_loss),
        ("data", data),
        ("steps", info.steps),
        ("batch size (global)", info.global_batch_size),
        ("optimizer", optimizer),
        ("EMA", info.ema),
        ("mixed precision", info.mixed_precision),
        ("hardware", info.hardware),
        ("training time", info.training_time),
        ("final training loss", info.final_loss),
    ]
    return [(name, str(value)) for name, value in rows if value is not None]


def eval_rows(card_data: ModelCardData) -> list[dict[str, Any]]:
    return [
        {
            "metric": result.metric_name or result.metric_type,
            "value": result.metric_value,
            "dataset": result.dataset_name + (f" ({result.dataset_split})" if result.dataset_split else ""),
        }
        for result in card_data.eval_results or []
    ]


def render_model_card(
    info: ModelCardInfo,
    card_data: ModelCardData | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the TREAD model card template (``model_cards/tread_dit.md``) with ``ModelCard.from_template``; see
    `card_metadata` for the metadata and `fid_result` for eval results."""
    metadata = card_metadata(info, card_data, eval_results)
    return _render_card(
        template_path or MODEL_CARD_TEMPLATE,
        metadata,
        info=info,
        repo=info.repo_id or info.model_name,
        training_rows=training_rows(info),
        eval_rows=eval_rows(metadata),
        remote_module=REMOTE_MODULE,
    )


def _render_card(template_path: str | os.PathLike, card_data: ModelCardData, **context: Any) -> ModelCard:
    """``ModelCard.from_template`` with one of the templates shipped in ``model_cards/`` (or another file), given the
    library version; the blank lines of left-out sections are squeezed."""
    from . import __version__

    card = ModelCard.from_template(card_data, template_path=str(template_path), library_version=__version__, **context)
    card.text = re.sub(r"\n{3,}", "\n\n", card.text)
    return card


def save_model_card(
    folder: str | os.PathLike,
    info: ModelCardInfo,
    card_data: ModelCardData | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Write ``README.md`` (the card) and ``tread_card.json`` (``info``, to render it again later) into ``folder``."""
    card = render_model_card(info, card_data, eval_results, template_path)
    _replace_file(Path(folder, "README.md"), str(card))
    _replace_file(Path(folder, CARD_INFO_FILE), info.to_json())
    return card


def load_model_card_info(folder: str | os.PathLike) -> ModelCardInfo | None:
    path = Path(folder, CARD_INFO_FILE)
    return ModelCardInfo.from_json(path.read_text()) if path.is_file() else None


@dataclasses.dataclass
class LoraCardInfo:
    """What the card of a text-to-image LoRA (``training/train_tread_t2i_lora.py``) says: the base pipeline, the
    adapters, how to load them, and the training run. A training value left None leaves its table row out."""

    base_model: str  # the Hub id or local folder trained from
    pipeline_class: str  # e.g. "PixArtSigmaPipeline"
    transformer_class: str
    family: str  # pixart, sd3 or flux (a tag)
    rank: int
    lora_alpha: float
    target_modules: list[str]
    repo_id: str  # where `load_lora_weights` finds the adapters: the Hub repo, or the output folder
    # False where the pipeline has no `load_lora_weights` (PixArt): the card's code injects the adapters with PEFT.
    diffusers_loader: bool = True
    prompt: str | None = None  # the validation prompt: the card's example and its images' caption
    # the training
    routes: str | None = None  # JSON
    objective: str | None = None  # the loss, in words
    dataset: str | None = None
    num_examples: int | None = None
    resolution: int | None = None
    steps: int | None = None
    global_batch_size: int | None = None
    batch_size_per_device: int | None = None
    gradient_accumulation_steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    mixed_precision: str | None = None
    hardware: str | None = None
    training_time: str | None = None
    final_loss: str | None = None
    command: str | None = None  # `launch_command`'s: the token redacted


def lora_training_rows(info: LoraCardInfo) -> list[tuple[str, str]]:
    """The rows of a LoRA card's training table, leaving out what is unknown."""
    data = info.dataset and _joined(
        f"{info.num_examples} image-caption pairs from `{info.dataset}`"
        if info.num_examples is not None
        else f"`{info.dataset}`",
        f"{info.resolution} px" if info.resolution else None,
    )
    steps = info.steps
    if steps is not None and info.global_batch_size:
        steps = f"{steps} at batch {info.global_batch_size}"
        if info.batch_size_per_device and info.gradient_accumulation_steps:
            steps += f" ({info.batch_size_per_device} per device x {info.gradient_accumulation_steps} accumulation)"
    learning_rate = info.learning_rate
    if learning_rate is not None and info.lr_scheduler:
        learning_rate = f"{learning_rate} ({info.lr_scheduler})"
    rows = [
        ("routes", info.routes and f"`{info.routes}`"),
        ("loss", info.objective),
        ("data", data),
        ("steps", steps),
        ("learning rate", learning_rate),
        ("mixed precision", info.mixed_precision),
        ("hardware, time", _joined(info.hardware, info.training_time)),
        ("final loss", info.final_loss),
    ]
    return [(name, str(value)) for name, value in rows if value is not None]


def render_lora_model_card(
    info: LoraCardInfo, image_files: Sequence[str] = (), template_path: str | os.PathLike | None = None
) -> ModelCard:
    """Render ``model_cards/tread_t2i_lora.md``: the Hub metadata Diffusers' LoRA training scripts write (base model,
    widget of ``image_files`` with the prompt, ``LORA_TAGS``) and the text (the adapters, how to load them, the
    training table)."""
    card_data = ModelCardData(
        license=None,
        library_name="diffusers",
        inference=True,
        base_model=None if Path(info.base_model).exists() else info.base_model,  # a Hub id, not a local folder
        instance_prompt=info.prompt,
        widget=[{"text": info.prompt, "output": {"url": name}} for name in image_files],
        tags=[*LORA_TAGS, info.family, "template:sd-lora"],
    )
    return _render_card(
        template_path or LORA_MODEL_CARD_TEMPLATE, card_data, info=info, training_rows=lora_training_rows(info)
    )


def save_lora_model_card(
    folder: str | os.PathLike,
    info: LoraCardInfo,
    images: Sequence[Any] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Write ``README.md`` (`render_lora_model_card`) into ``folder``, with ``images`` (PIL images, e.g. the final
    validation samples) saved next to it as ``image_<i>.png`` for the card's widget."""
    image_files = []
    for index, image in enumerate(images or []):
        image_files.append(f"image_{index}.png")
        image.save(Path(folder, image_files[-1]))
    card = render_lora_model_card(info, image_files, template_path)
    _replace_file(Path(folder, "README.md"), str(card))
    return card


# ----------------------------------------------------------------------------------------------------------------------
# Hub-ready folders and pushing
# ----------------------------------------------------------------------------------------------------------------------


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # no copy of the weights when on the same file system
    except OSError:
        shutil.copy2(source, target)


def card_info_from_folder(folder: str | os.PathLike, model_name: str | None = None) -> ModelCardInfo:
    """What a pipeline folder itself tells about the model (configs, weights, samples), for a card when the training
    run left no ``tread_card.json``."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    info = ModelCardInfo(model_name=model_name or folder.resolve().name)
    config_path = folder / "transformer" / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        info.model_class = config.get("_class_name", info.model_class)
        if model_class_for_config(config) is TreadSSM2DModel:
            info.backbone = (
                f"bidirectional Mamba, {config.get('num_layers')} layers, width {config.get('hidden_size')}"
            )
        else:
            width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
            info.backbone = f"DiT, {config.get('num_layers')} layers, width {width}"
        info.backbone += f", patch {config.get('patch_size')}"
        info.num_tokens = (config.get("sample_size", 0) // max(config.get("patch_size", 1), 1)) ** 2
        info.routes = json.dumps(config.get("routes", []))
        info.route_reinsertion = config.get("route_reinsertion")
        info.num_classes = config.get("num_embeds_ada_norm")
        info.example_labels = list(range(min(4, info.num_classes or 1)))
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        if weights.is_file():
            from safetensors import safe_open

            with safe_open(weights, framework="pt") as tensors:
                count = sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
            info.num_parameters = f"{count / 1e6:.2f}M"
    info.data_space = "pixel space" if list(index.get("vae") or [None])[0] is None else "VAE latents"
    info.grid = info.grid if (folder / str(info.grid)).is_file() else None
    info.loss_plot = info.loss_plot if (folder / str(info.loss_plot)).is_file() else None
    if (folder / "README.md").is_file():  # a card from before tread_card.json: keep its training table and command
        training = ModelCard.load(folder / "README.md").text.partition("## Training")[2].split("\n## ")[0]
        rows = re.findall(r"^\| (.+?) \| (.+?) \|$", training, flags=re.MULTILINE)
        info.training_table = [[name, value] for name, value in rows if name != "setting"] or None
        command = re.search(r"```bash\n(.+?)\n```", training, flags=re.DOTALL)
        info.command = command.group(1) if command else None
    return info


def prepare_hub_folder(
    folder: str | os.PathLike,
    target: str | os.PathLike,
    repo_id: str | None = None,
    demo_url: str | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    info: ModelCardInfo | None = None,
    ignore_patterns: Sequence[str] = HUB_IGNORE_PATTERNS,
) -> Path:
    """Lay out ``folder`` (a saved pipeline) in ``target`` as it goes to the Hub: its files minus
    ``ignore_patterns``, the remote-code bundle with its ``model_index.json``, and the card rendered again with
    ``repo_id``, ``demo_url`` and ``eval_results`` from ``info`` (default: the folder's ``tread_card.json``, else
    `card_info_from_folder`), keeping the Hub metadata of the folder's ``README.md``. ``folder`` is not changed
    (files are hard-linked where possible and replaced, never written through)."""
    folder, target = Path(folder), Path(target)
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"{folder} is not a pipeline folder (no model_index.json); for a training checkpoint use "
            "training/push_to_hub.py."
        )
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch(relative, pattern) for pattern in ignore_patterns):
            _link_or_copy(path, target / relative)
    write_remote_code(target)

    info = dataclasses.replace(info or load_model_card_info(folder) or card_info_from_folder(folder))
    info.repo_id = repo_id or info.repo_id
    info.demo_url = demo_url or info.demo_url
    card_data = ModelCard.load(folder / "README.md").data if (folder / "README.md").is_file() else None
    save_model_card(target, info, card_data, eval_results)
    return target


@contextlib.contextmanager
def hub_folder(folder: str | os.PathLike, **kwargs) -> Iterator[Path]:
    """`prepare_hub_folder` into a temporary folder of the same name, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tread-hub-") as workdir:
        yield prepare_hub_folder(folder, Path(workdir, Path(folder).resolve().name), **kwargs)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload TREAD pipeline",
    space_id: str | None = None,
    demo_url: str | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    info: ModelCardInfo | None = None,
) -> str:
    """Upload a pipeline folder as `prepare_hub_folder` lays it out to the model repo ``repo_id`` (created if
    needed), then the demo Space ``space_id`` (see `push_space`) when given, pinned to the model commit just made
    (its card links to the Space, whose repo is created first); returns the model's URL.

    ``token`` only goes to ``huggingface_hub`` (None: ``HF_TOKEN`` or the logged-in token); it is never written to a
    file or logged.
    """
    repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    if space_id is not None:
        space_id = create_space_repo(space_id, token=token, private=private)
        demo_url = f"https://huggingface.co/spaces/{space_id}"
    with hub_folder(folder, repo_id=repo_id, demo_url=demo_url, eval_results=eval_results, info=info) as staged:
        commit = upload_folder(repo_id=repo_id, folder_path=staged, commit_message=commit_message, token=token)
    if space_id is not None:
        upload_space(space_id, repo_id, commit.oid, token=token)
    return f"https://huggingface.co/{repo_id}"


def prepare_space(target: str | os.PathLike, model_id: str, space_dir: str | os.PathLike = SPACE_DIR) -> Path:
    """Copy the Gradio demo (``spaces/tread-dit``, shipped with the package) to ``target``, its card listing
    ``model_id`` (so the model page links to the Space): the folder `push_space` uploads."""
    target = Path(target)
    shutil.copytree(space_dir, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".gradio"))
    card = SpaceCard.load(target / "README.md")
    card.data.models = list(dict.fromkeys([*(card.data.models or []), model_id]))
    card.save(target / "README.md")
    return target


def create_space_repo(space_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the Gradio Space ``space_id`` if needed; return its full id (``user/name``)."""
    return create_repo(
        space_id, repo_type="space", space_sdk="gradio", exist_ok=True, private=private, token=token
    ).repo_id


def upload_space(
    space_id: str,
    model_id: str,
    model_revision: str,
    token: str | None = None,
    space_dir: str | os.PathLike = SPACE_DIR,
) -> None:
    """Upload the demo to the existing Space ``space_id`` and set its ``TREAD_MODEL`` / ``TREAD_MODEL_REVISION``
    variables: the app runs the model's remote code only at that commit."""
    with tempfile.TemporaryDirectory(prefix="tread-space-") as workdir:
        staged = prepare_space(Path(workdir, Path(space_dir).name), model_id, space_dir)
        upload_folder(
            repo_id=space_id, repo_type="space", folder_path=staged, commit_message="Upload demo", token=token
        )
    add_space_variable(space_id, "TREAD_MODEL", model_id, token=token)
    add_space_variable(space_id, "TREAD_MODEL_REVISION", model_revision, token=token)


def push_space(
    space_id: str,
    model_id: str,
    token: str | None = None,
    private: bool = False,
    space_dir: str | os.PathLike = SPACE_DIR,
    model_revision: str | None = None,
) -> str:
    """Push the Gradio demo (``spaces/tread-dit``) as the Space ``space_id``, showing ``model_id``; returns its URL.

    The Space's card lists the model (so the model page links to it), its ``TREAD_MODEL`` variable names it and
    ``TREAD_MODEL_REVISION`` pins the commit whose code the app runs (default: the model repo's current head).
    """
    space_id = create_space_repo(space_id, token=token, private=private)
    model_revision = model_revision or model_info(model_id, token=token).sha
    upload_space(space_id, model_id, model_revision, token=token, space_dir=space_dir)
    return f"https://huggingface.co/spaces/{space_id}"


# ----------------------------------------------------------------------------------------------------------------------
# Uploads from a training run, and keeping the token out of everything it writes
# ----------------------------------------------------------------------------------------------------------------------


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with each secret's value and whatever follows a ``--hub_token`` option replaced by ``<redacted>``:
    by value, so that a token reaching the text by any route (an abbreviated option, a config file) is caught too."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return re.sub(r"(--hub_token[ =])\S+", r"\1<redacted>", text)


def launch_command(script: str, argv: Sequence[str], secrets: Iterable[str | None] = ()) -> str:
    """The ``accelerate launch`` command that ran ``script``, for a model card: quoted, with secrets redacted
    (``secrets`` plus ``HF_TOKEN``)."""
    text = " ".join(shlex.quote(arg) for arg in ["accelerate", "launch", script, *argv])
    return redact(text, [*secrets, os.environ.get("HF_TOKEN")])


def upload_output(
    folder: str | os.PathLike,
    repo_id: str,
    commit_message: str,
    token: str | None = None,
    path_in_repo: str | None = None,
    run_as_future: bool = False,
):
    """Upload a training run's output folder, or one of its checkpoints (``path_in_repo``), without what
    `HUB_IGNORE_PATTERNS` lists. A pipeline folder uploaded in the foreground goes up as `prepare_hub_folder` lays it
    out (with its remote-code bundle); the folder itself is not changed."""

    def upload(path):
        return upload_folder(
            repo_id=repo_id,
            folder_path=path,
            path_in_repo=path_in_repo,
            commit_message=commit_message,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            token=token,
            run_as_future=run_as_future,
        )

    if run_as_future or path_in_repo or not Path(folder, "model_index.json").is_file():
        return upload(folder)
    with hub_folder(folder, repo_id=repo_id) as staged:
        return upload(staged)


def upload_final_output(folder: str | os.PathLike, repo_id: str, token: str | None = None) -> None:
    """The end-of-training upload of a run's output folder (`upload_output`); a failure raises a RuntimeError that says
    the folder is intact and gives the command that retries it."""
    try:
        upload_output(folder, repo_id, "End of training", token=token)
    except Exception as error:
        if Path(folder, "model_index.json").is_file():
            retry = f"python training/push_to_hub.py {folder} --hub_model_id {repo_id}"
        else:
            retry = f"hf upload {repo_id} {folder} --exclude {' '.join(repr(p) for p in HUB_IGNORE_PATTERNS)}"
        raise RuntimeError(
            f"Uploading {folder} to {repo_id} failed: {error}. The folder is complete and unchanged; retry with "
            f"`{retry}`."
        ) from error


class CheckpointUploads:
    """``--push_checkpoints``: each checkpoint is uploaded in the background while training goes on. A failed upload
    is logged and retried (``retries`` times, at the next `wait`); it never stops training. `report` says exactly which
    checkpoints reached the Hub and which did not, with the error."""

    def __init__(self, repo_id: str, token: str | None = None, retries: int = 2):
        self.repo_id, self.token, self.retries = repo_id, token, retries
        self.pending: list[tuple[Path, Any, int]] = []  # (checkpoint, future, attempt)
        self.uploaded: list[str] = []
        self.failed: dict[str, str] = {}

    def submit(self, checkpoint: str | os.PathLike, attempt: int = 1) -> None:
        checkpoint = Path(checkpoint)
        try:
            future = upload_output(
                checkpoint,
                self.repo_id,
                f"{checkpoint.name} (attempt {attempt})" if attempt > 1 else checkpoint.name,
                token=self.token,
                path_in_repo=checkpoint.name,
                run_as_future=True,
            )
        except Exception as error:  # noqa: BLE001 - e.g. the upload could not even be queued
            future = error
        self.pending.append((checkpoint, future, attempt))

    def wait(self) -> None:
        """Wait for every pending upload (call before pruning checkpoints and at the end); retry failed ones."""
        while self.pending:
            checkpoint, future, attempt = self.pending.pop(0)
            try:
                if isinstance(future, Exception):
                    raise future
                future.result()
            except Exception as error:  # noqa: BLE001 - a network or Hub error must not end training
                if attempt <= self.retries and checkpoint.is_dir():
                    logger.warning(f"Uploading {checkpoint.name} to {self.repo_id} failed ({error}); retrying.")
                    self.submit(checkpoint, attempt + 1)
                else:
                    logger.error(
                        f"Uploading {checkpoint.name} to {self.repo_id} failed after {attempt} tries: {error}"
                    )
                    self.failed[checkpoint.name] = f"{type(error).__name__}: {error}"
            else:
                self.uploaded.append(checkpoint.name)
                self.failed.pop(checkpoint.name, None)

    def report(self) -> str:
        """One line for the end of training: what reached the Hub and what did not."""
        text = f"Checkpoint uploads to {self.repo_id}: {len(self.uploaded)} done"
        if self.uploaded:
            text += f" ({', '.join(self.uploaded)})"
        if self.failed:
            failures = "; ".join(f"{name}: {error}" for name, error in self.failed.items())
            text += f"; {len(self.failed)} failed ({failures}): push them with training/push_to_hub.py"
        return text + "."


def bundle_files() -> dict[str, str]:
    """The remote-code bundle of a `TreadDiTPipeline` with a `TreadTransformer2DModel`: ``{repo path: source}``."""
    return remote_code_files(
        {"_class_name": REMOTE_PIPELINE_CLASS, "transformer": [PACKAGE, "TreadTransformer2DModel"]}
    )


if __name__ == "__main__":  # python -m diffusers_tread.hub [DIR]: write the bundle to look at (pipelines/tread_dit/)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else REPO_ROOT / "pipelines" / "tread_dit")
    for relative, text in bundle_files().items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_text(text, encoding="utf-8")
        print(out / relative)
