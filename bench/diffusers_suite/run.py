"""Run Diffusers' own DiT model and pipeline tests against diffusers_tread's classes (or, with ``--stock``, unchanged).

Nothing of Diffusers' test code is kept in this repository: the runner copies the ``tests/`` tree of a Diffusers
checkout into a temporary folder, rewrites the two DiT test files there so that ``DiTTransformer2DModel`` and
``DiTPipeline`` name ``TreadTransformer2DModel`` and ``TreadDiTPipeline``, and runs pytest on them. The tests run
against the *installed* diffusers (the checkout's ``src/`` is not copied), so use a checkout of the installed version.

    python bench/diffusers_suite/run.py /path/to/diffusers            # ours
    python bench/diffusers_suite/run.py /path/to/diffusers --stock    # the same files, unmodified
    DIFFUSERS_SRC=/path/to/diffusers python bench/diffusers_suite/run.py -- -k callback   # extra pytest arguments

The path may be a work tree (its ``tests/`` is copied) or a git directory, bare included (``--ref``, default HEAD, is
exported with ``git archive``). Needs Diffusers' test dependencies ``parameterized`` and ``requests-mock``.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The test files, and per file the Diffusers names replaced by ours (whole identifiers, also inside strings, e.g. the
# class-name set of test_gradient_checkpointing_is_applied).
TEST_FILES: dict[str, dict[str, str]] = {
    "tests/models/transformers/test_models_dit_transformer2d.py": {
        "DiTTransformer2DModel": "TreadTransformer2DModel",
    },
    "tests/pipelines/dit/test_dit.py": {
        "DiTPipeline": "TreadDiTPipeline",
        "DiTTransformer2DModel": "TreadTransformer2DModel",
    },
}

# Tests (`Class::test` node-id suffixes) that fail with our classes by design (see README.md): marked
# xfail(strict=True) with the reason, so the run stays green while they fail and turns red if one starts passing.
KNOWN_DIFFERENCES: dict[str, str] = {
    "TestDiTTransformer2D::test_correct_class_remapping_from_dict_config": (
        "Diffusers' legacy Transformer2DModel remaps a DiT config to its own DiTTransformer2DModel, never to a "
        "subclass; the rewritten assert asks for a TreadTransformer2DModel."
    ),
    "TestDiTTransformer2D::test_correct_class_remapping_from_pretrained_config": (
        "as test_correct_class_remapping_from_dict_config (and it downloads facebook/DiT-XL-2-256's config: offline "
        "it fails for the stock class too)."
    ),
    "TestDiTTransformer2D::test_correct_class_remapping": (
        "as test_correct_class_remapping_from_dict_config (@slow: downloads facebook/DiT-XL-2-256)."
    ),
    # Diffusers 0.35's test file (class DiTTransformer2DModelTests): the same three remapping tests, and AutoModel.
    "DiTTransformer2DModelTests::test_correct_class_remapping_from_dict_config": (
        "as TestDiTTransformer2D::test_correct_class_remapping_from_dict_config (Diffusers 0.35's test class name)."
    ),
    "DiTTransformer2DModelTests::test_correct_class_remapping_from_pretrained_config": (
        "as TestDiTTransformer2D::test_correct_class_remapping_from_pretrained_config."
    ),
    "DiTTransformer2DModelTests::test_correct_class_remapping": "as TestDiTTransformer2D::test_correct_class_remapping.",
    "DiTTransformer2DModelTests::test_auto_model": (
        "Diffusers 0.35's AutoModel looks a config's _class_name up in the diffusers module only, so a saved "
        "TreadTransformer2DModel is not found there (load it with TreadTransformer2DModel.from_pretrained)."
    ),
    "TestDiTTransformer2DAttention::test_attention_processor_count_mismatch_raises_error": (
        "the test's model has one attention layer, so its 'wrong' one-entry processor dict has the right count; "
        "stock DiTTransformer2DModel has no set_attn_processor and skips it, ours (AttentionMixin) has one and "
        "raises for a real mismatch (tests/test_diffusers_suite.py)."
    ),
}

PLUGIN = """
import pytest

KNOWN_DIFFERENCES = {known!r}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for suffix, reason in KNOWN_DIFFERENCES.items():
            if item.nodeid.endswith(suffix):
                item.add_marker(pytest.mark.xfail(reason="diffusers_tread: " + reason, strict=True))
"""


def rewrite(source: str, names: dict[str, str]) -> str:
    """Point a test file at our classes: drop-in names replaced everywhere except in its ``from diffusers import``
    statements (left as they are), and ``from diffusers_tread import <ours>`` added after the last of those."""
    tree = ast.parse(source)
    imports = [
        node
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "diffusers" and node.level == 0
    ]
    imported = {alias.name for node in imports for alias in node.names}
    missing = set(names) - imported
    if missing:
        raise SystemExit(f"{sorted(missing)} not imported from diffusers any more: update TEST_FILES in {__file__}.")
    skip = {line for node in imports for line in range(node.lineno, node.end_lineno + 1)}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    lines = source.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if index + 1 not in skip:
            lines[index] = pattern.sub(lambda match: names[match.group(1)], line)
    ours = ", ".join(sorted(set(names.values())))
    lines.insert(max(skip), f"from diffusers_tread import {ours}\n")
    return "".join(lines)


def copy_tests(diffusers: Path, ref: str | None, destination: Path) -> None:
    """Copy the checkout's ``tests/`` into ``destination`` (a work tree directly; a git directory via git archive)."""
    if ref is None and (diffusers / "tests").is_dir():
        shutil.copytree(diffusers / "tests", destination / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        return
    git_dir = diffusers / ".git" if (diffusers / ".git").exists() else diffusers
    archive = subprocess.run(
        ["git", "--git-dir", str(git_dir), "archive", "--format=tar", ref or "HEAD", "tests"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("diffusers", nargs="?", default=os.environ.get("DIFFUSERS_SRC"), help="Diffusers checkout")
    parser.add_argument("--ref", default=None, help="git revision to export (default: the work tree, else HEAD)")
    parser.add_argument("--stock", action="store_true", help="run the files unmodified, against Diffusers' classes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    pytest_args = argv[split + 1 :]  # after --: passed on to pytest
    if not args.diffusers:
        parser.error("give the path of a Diffusers checkout (argument or DIFFUSERS_SRC)")

    workdir = Path(tempfile.mkdtemp(prefix="diffusers_suite_"))
    try:
        copy_tests(Path(args.diffusers).resolve(), args.ref, workdir)
        for relative, names in TEST_FILES.items():
            path = workdir / relative
            if not path.is_file():
                raise SystemExit(f"{relative} not found in {args.diffusers}")
            if not args.stock:
                path.write_text(rewrite(path.read_text(), names))
        if not args.stock:
            plugin = workdir / "diffusers_tread_known_differences.py"
            plugin.write_text(PLUGIN.format(known=KNOWN_DIFFERENCES))
            pytest_args = ["-p", "diffusers_tread_known_differences", *pytest_args]
        print(f"{'stock' if args.stock else 'diffusers_tread'} run of {list(TEST_FILES)} in {workdir}", flush=True)
        command = [sys.executable, "-m", "pytest", *TEST_FILES, "-p", "no:cacheprovider", "-rfEsxX", *pytest_args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(workdir), os.environ.get("PYTHONPATH")])))
        return subprocess.run(command, cwd=workdir, env=env).returncode
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
