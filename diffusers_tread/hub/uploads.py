"""Hub uploads: the Hub-ready layout of a pipeline folder (files minus the ignore list, the remote-code bundle, the card
rendered again), pushing it with its demo Space, and a training run's uploads (the final folder, background checkpoint
uploads with retries). The token only ever goes to ``huggingface_hub``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, SpaceCard, add_space_variable, create_repo, upload_folder

from ..checkpointing import STAGING_PATTERNS
from .bundle import write_remote_code
from .cards import ModelCardInfo, _shipped_folder, card_info_from_folder, load_model_card_info, save_model_card

logger = logging.getLogger(__name__)

SPACE_DIR = _shipped_folder("spaces") / "tread-dit"
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


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # no copy of the weights when on the same file system
    except OSError:
        shutil.copy2(source, target)


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
    needed), then the demo Space ``space_id`` (`upload_space`) when given, pinned to the model commit just made
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
    ``model_id`` (so the model page links to the Space): the folder `upload_space` uploads."""
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
