"""The remote-code bundle: standalone modules generated from this package's own sources, for the Hub.

A folder written by ``TreadDiTPipeline.save_pretrained`` (or by ``training/train_tread.py``) records its transformer as
``["diffusers_tread", "TreadTransformer2DModel"]``, which only loads where ``diffusers_tread`` is installed.
`write_remote_code` adds standalone modules generated from this package's sources (`generate_module` inlines a module
and the package modules it imports, relative imports resolved) and a ``model_index.json`` that points at them, so that
plain Diffusers runs the checkpoint::

    pipe = DiffusionPipeline.from_pretrained("user/repo", trust_remote_code=True)

A build tool rather than Hub API: it reads source files and writes Python; ``python -m diffusers_tread.hub`` writes the
bundle of this checkout to ``pipelines/tread_dit/``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PACKAGE = "diffusers_tread"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = PACKAGE_DIR.parent

# The remote-code bundle is two modules generated from the library's sources. `transformer/tread_dit.py` holds the
# models a checkpoint needs (its transformer class and the router; model_index.json
# `"transformer": ["tread_dit", "TreadTransformer2DModel"]`); `tread_dit.py` at the repo root is the pipeline module
# almost verbatim (`"_class_name": ["tread_dit", "TreadDiTPipeline"]`), its imports of the models rewritten to
# `from .transformer.tread_dit import ...`: the one relative import Diffusers' loader fetches with a root module
# (two levels, `<folder>.<module>`; utils/dynamic_modules_utils.py). A component's own file cannot import siblings.
# Diffusers copies a component's module to `diffusers_modules/local/<file name>` and runs it there, so the loaded
# transformer's class need not be the one the pipeline module imported: the pipeline checks configs, never classes.
REMOTE_MODULE = "tread_dit"
REMOTE_SOURCE = f"{PACKAGE}.pipelines.pipeline_tread_dit"
REMOTE_PIPELINE_CLASS = "TreadDiTPipeline"
# each component class of the bundle and the library module that defines it
REMOTE_COMPONENT_MODULES = {
    "TreadTransformer2DModel": f"{PACKAGE}.models.transformer_tread",
    "TreadSSM2DModel": f"{PACKAGE}.models.ssm_tread",
}
REMOTE_COMPONENT_CLASSES = tuple(REMOTE_COMPONENT_MODULES)
REMOTE_COMPONENT = "transformer"  # the pipeline's models come from this component's module


# The patterns Diffusers' dynamic-module loader uses to find imports (utils/dynamic_modules_utils.py): it imports every
# top-level module named this way, so no line of a bundle may name this package like that, not even in a docstring.
_IMPORT_LINE = re.compile(r"^\s*(?:import\s+(\S+)\s*$|from\s+(\S+)\s+import)", flags=re.MULTILINE)


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


def generate_module(module: str | Sequence[str], imported_from: Mapping[str, str] | None = None) -> str:
    """Generate a standalone module from ``module`` of this package (e.g. ``"diffusers_tread.routing"``), or from
    several modules (the first one's docstring is the result's).

    The module and every package module it imports (recursively) are inlined in dependency order: their top-level
    imports of other packages are merged at the top; their imports of this package are dropped, and a module imported
    as a namespace (``from .. import routing``) has its ``routing.name`` uses rewritten to ``name``. Two inlined
    modules defining the same name, or an import this cannot resolve, raise a ``ValueError``; so does output that
    would still import this package. The result needs only the packages the sources import (torch, diffusers).

    ``imported_from`` maps package modules that are not inlined to the relative module the result imports their
    names from instead (e.g. ``{"diffusers_tread.models.transformer_tread": ".transformer.tread_dit"}``): the
    pipeline module imports its models from the component's module that way.
    """
    from .. import __version__

    modules = [module] if isinstance(module, str) else list(module)
    imported_from = dict(imported_from or {})
    order: list[_Source] = []
    seen: dict[str, _Source] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ValueError(f"Import cycle: {' -> '.join((*chain, name))}.")
        if name in seen or (chain and name in imported_from):
            return
        source = _read(name)
        seen[name] = source
        for _, imported, _, _ in _package_imports(source):
            visit(imported, (*chain, name))
        order.append(source)

    for name in modules:
        visit(name, ())

    bindings: dict[str, tuple[str, str | None]] = {}
    defined: dict[str, str] = {}
    for source in order:
        for name in _defined_names(source.tree):
            if name in defined:
                raise ValueError(f"`{name}` is defined in both {defined[name]} and {source.name}; rename one.")
            defined[name] = source.name
    kept_imports: dict[str, set[str]] = {}  # relative module -> the names imported from it
    root = seen[modules[0]]
    sections = []
    for source in order:
        removed, namespaces = set(), set()
        for node, imported, attribute, bound in _package_imports(source):
            removed.add(id(node))
            if imported in imported_from:
                if attribute is None or attribute not in _defined_names(_read(imported).tree):
                    raise ValueError(f"{source.path}: import names that {imported} defines, not a module.")
                if bound in defined:
                    raise ValueError(f"{source.path}: `{bound}` is both imported and defined by inlined modules.")
                kept_imports.setdefault(imported_from[imported], set()).add(attribute)
            elif attribute is None:
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
        if source is not root and docstring:
            header += "\n#\n" + _comment(docstring)
        sections.append(header + "\n\n" + _module_body(source, namespaces, removed))

    origin = ", ".join(source.path.relative_to(PACKAGE_DIR.parent).as_posix() for source in order)
    docstring = ast.get_docstring(root.tree, clean=False) or ""
    if '"""' in docstring or docstring.endswith('"'):
        raise ValueError(f"{root.path}: the module docstring cannot be re-quoted.")
    imports = [f"from {name} import {', '.join(sorted(names))}" for name, names in sorted(kept_imports.items())]
    kept = [
        f"{_module_path(name).relative_to(PACKAGE_DIR.parent).as_posix()} ({imported_from[name]})"
        for name in imported_from
    ]
    text = "\n".join(
        [
            f"# Generated by {PACKAGE}.hub.generate_module from {PACKAGE} {__version__}: do not edit;",
            "# regenerate from the library instead. Inlined sources, in order:",
            f"# {origin}.",
            *([f"# Imported instead of inlined: {', '.join(kept)}."] if kept else []),
            ("r" if "\\" in docstring else "") + '"""' + docstring + '"""',
            "",
            "\n".join(_import_lines(bindings)),
            *(["", *imports] if imports else []),
            "",
            "",
            "\n\n\n".join(sections),
            "",
        ]
    )
    compile(text, f"<{module} bundle>", "exec")
    for match in _IMPORT_LINE.finditer(text):
        named = (match.group(1) or match.group(2)).lstrip(".")
        allowed = match.group(2) in kept_imports
        if (match.group(0).lstrip().startswith("from .") and not allowed) or named.split(".")[0] == PACKAGE:
            raise ValueError(f"The generated module still imports {match.group(0).strip()!r}.")
    return text


def remote_code_files(model_index: Mapping[str, Any]) -> dict[str, str]:
    """The bundle a pipeline folder with this ``model_index.json`` (library layout) needs: ``{repo path: source}``.

    Each of this package's components gets ``<component>/tread_dit.py`` with its model class (and the router), and a
    `TreadDiTPipeline` gets ``tread_dit.py``, the pipeline module importing its models from
    ``transformer/tread_dit.py`` (written too when the transformer is a stock Diffusers model), which then also holds
    the models the pipeline module imports.
    """
    components = {component: value[1] for component, value in model_index.items() if _is_library_entry(value)}
    pipeline = _class_name(model_index) == REMOTE_PIPELINE_CLASS
    pipeline_models = []  # the model modules the pipeline's source imports (it imports nothing else of the package)
    if pipeline:
        imported = dict.fromkeys(module for _, module, _, _ in _package_imports(_read(REMOTE_SOURCE)))
        pipeline_models = [module for module in imported if module in REMOTE_COMPONENT_MODULES.values()]
        components.setdefault(REMOTE_COMPONENT, None)
    files = {}
    for component, class_name in components.items():
        modules = [REMOTE_COMPONENT_MODULES[class_name]] if class_name else []
        modules += pipeline_models if component == REMOTE_COMPONENT else []
        text = generate_module(list(dict.fromkeys(modules)))
        if class_name and not re.search(rf"^class {class_name}\b", text, flags=re.MULTILINE):
            raise ValueError(f"The generated {component}/{REMOTE_MODULE}.py does not define {class_name}.")
        files[f"{component}/{REMOTE_MODULE}.py"] = text
    if pipeline:
        relative = f".{REMOTE_COMPONENT}.{REMOTE_MODULE}"
        text = generate_module(REMOTE_SOURCE, imported_from=dict.fromkeys(pipeline_models, relative))
        if not re.search(rf"^class {REMOTE_PIPELINE_CLASS}\b", text, flags=re.MULTILINE):
            raise ValueError(f"The generated {REMOTE_MODULE}.py does not define {REMOTE_PIPELINE_CLASS}.")
        files = {f"{REMOTE_MODULE}.py": text, **files}
    return files


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


def bundle_files() -> dict[str, str]:
    """The remote-code bundle of a `TreadDiTPipeline` with a `TreadTransformer2DModel`: ``{repo path: source}``."""
    return remote_code_files(
        {"_class_name": REMOTE_PIPELINE_CLASS, "transformer": [PACKAGE, "TreadTransformer2DModel"]}
    )
