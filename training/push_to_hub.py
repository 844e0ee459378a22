#!/usr/bin/env python
"""Push a finished training output folder, or one of its checkpoints, to the Hugging Face Hub.

The upload is what `accelerate launch training/train_tread.py --push_to_hub` sends at the end of training: the
pipeline (EMA weights), its model card, and the remote-code bundle that lets plain Diffusers run it
(`DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`); optionally with a demo Space and eval results.

    python training/push_to_hub.py tread-digits --hub_model_id user/tread-digits
    python training/push_to_hub.py tread-digits --hub_model_id user/tread-digits --space_id user/tread-digits-demo
    python training/push_to_hub.py tread-digits/checkpoint-2000 --hub_model_id user/tread-digits-2k
    python training/push_to_hub.py out --hub_model_id user/dit-xl-tread --eval_results fid.json
    python training/push_to_hub.py tread-digits --hub_model_id user/tread-digits --save_to hub-preview  # no upload

A checkpoint (`checkpoint-<step>/`, written by `accelerator.save_state`) becomes a pipeline with its EMA weights and
the scheduler, VAE and class names of the finished folder around it, or of `--objective` (and `--vae`) when training
has not finished. The token comes from `--hub_token`, `HF_TOKEN` or `hf auth login`; it is never written or printed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

from diffusers_tread import hub
from diffusers_tread.checkpointing import unpushable
from diffusers_tread.training_utils import ArgumentParser, main_with_messages

logger = logging.getLogger("push_to_hub")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Push a TREAD output folder or checkpoint to the Hugging Face Hub.")
    parser.add_argument("folder", help="a training output folder (a saved pipeline) or one of its checkpoint-<step>")
    parser.add_argument("--hub_model_id", required=True, help="the model repo, e.g. user/tread-digits")
    parser.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the logged-in token")
    parser.add_argument("--hub_private_repo", action="store_true")
    parser.add_argument("--space_id", default=None, help="also push the Gradio demo (spaces/tread-dit) as this Space")
    parser.add_argument("--demo_url", default=None, help="link an existing demo instead of pushing one")
    parser.add_argument(
        "--eval_results",
        type=eval_results_file,
        default=None,
        help='a JSON file: a list of huggingface_hub.EvalResult fields (or one), e.g. [{"metric_type": "fid", '
        '"metric_value": 7.4, "dataset_type": "imagenet-1k", "dataset_name": "ImageNet 256x256", "metric_name": '
        '"FID-50K"}]; read when the options are parsed',
    )
    parser.add_argument("--objective", default=None, help="for a checkpoint without a finished folder: its objective")
    parser.add_argument("--vae", default=None, help="for a checkpoint without a finished folder: its VAE, if latent")
    parser.add_argument("--no_ema", action="store_true", help="push a checkpoint's raw weights, not its EMA weights")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--save_to", default=None, help="write the Hub-ready folder here instead of uploading")
    args = parser.parse_args(argv)
    if args.space_id and args.demo_url:
        parser.error("give --space_id (push a demo) or --demo_url (link one), not both")
    if args.space_id and args.save_to:
        parser.error("--save_to uploads nothing; leave out --space_id")
    return args


def eval_results_file(path: str) -> list[EvalResult]:
    """`--eval_results`: the file's EvalResult fields (``task_type`` defaults to the card's pipeline tag), read by
    argparse, so that a missing or malformed file is a usage error before anything is loaded or uploaded."""
    try:
        entries = json.loads(Path(path).read_text())
        entries = [entries] if isinstance(entries, dict) else entries
        return [EvalResult(**{"task_type": hub.PIPELINE_TAG, **entry}) for entry in entries]
    except (OSError, ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"{path}: {error}") from None


def is_checkpoint(folder: Path) -> bool:
    return not (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file()


def checkpoint_pipeline(checkpoint: Path, target: Path, args: argparse.Namespace) -> hub.ModelCardInfo:
    """Save a checkpoint as a pipeline folder in ``target``; returns its card info."""
    from diffusers import AutoencoderKL

    from diffusers_tread import TreadDiTPipeline, model_class_for_config
    from diffusers_tread.objectives import get_objective

    weights = checkpoint / "transformer_ema"
    if args.no_ema or not (weights / "config.json").is_file():
        weights = checkpoint / "transformer"
    transformer = model_class_for_config(weights).from_pretrained(weights)
    run = checkpoint.resolve().parent
    if (run / "model_index.json").is_file():  # the finished run: its scheduler, VAE and class names
        pipeline = TreadDiTPipeline.from_pretrained(run, transformer=transformer)
    elif args.objective:
        vae = AutoencoderKL.from_pretrained(args.vae) if args.vae else None
        pipeline = TreadDiTPipeline(
            transformer=transformer, vae=vae, scheduler=get_objective(args.objective).make_scheduler()
        )
    else:
        raise ValueError(
            f"{run} has no finished pipeline (model_index.json) to take the scheduler and class names from: pass "
            "--objective (ddpm, flow or edm, as trained) and, for a latent model, --vae."
        )
    pipeline.save_pretrained(target)

    step = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint.name.rsplit("-", 1)[-1].isdigit() else None
    info = hub.card_info_from_folder(target, model_name=args.hub_model_id.split("/")[-1])
    run_info = hub.load_model_card_info(run)
    if run_info is not None:  # the run's setup, at this checkpoint's step
        info = dataclasses.replace(
            run_info, model_name=info.model_name, steps=step, training_time=None, final_loss=None, loss_plot=None
        )
    else:
        info.steps = step
    for row in csv.reader((run / "loss_history.csv").open()) if (run / "loss_history.csv").is_file() else []:
        if step is not None and row and int(row[0]) == step:
            info.final_loss, info.training_time = f"{float(row[1]):.4f}", f"{float(row[2]) / 60:.1f} min"
    grid = run / "samples" / f"step_{step:07d}.png" if step is not None else None
    info.grid = None
    if grid is not None and grid.is_file():
        (target / "samples").mkdir(exist_ok=True)
        shutil.copy(grid, target / "samples" / grid.name)
        info.grid = f"samples/{grid.name}"
    if (run / "README.md").is_file():  # the run's Hub metadata (datasets, base model), not its final eval results
        card = ModelCard.load(run / "README.md")
        card.data.eval_results, card.data.model_name = None, None
        card.save(target / "README.md")
    return info


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    folder = Path(args.folder)
    problem = unpushable(folder)  # an interrupted save: a checkpoint without its marker, a staging folder
    if problem:
        raise ValueError(problem)
    eval_results = args.eval_results
    with tempfile.TemporaryDirectory(prefix="tread-push-") as workdir:
        info = None
        if is_checkpoint(folder):
            pipeline_folder = Path(workdir, f"{folder.resolve().parent.name}-{folder.name}")
            info = checkpoint_pipeline(folder, pipeline_folder, args)
            folder = pipeline_folder
        elif not (folder / "model_index.json").is_file():
            raise SystemExit(f"{folder} is neither a pipeline folder (model_index.json) nor a training checkpoint.")
        elif hub.load_model_card_info(folder) is None:
            info = hub.card_info_from_folder(folder, model_name=args.hub_model_id.split("/")[-1])

        if args.save_to:
            target = hub.prepare_hub_folder(
                folder,
                args.save_to,
                repo_id=args.hub_model_id,
                demo_url=args.demo_url,
                eval_results=eval_results,
                info=info,
            )
            logger.info(f"Wrote the Hub-ready folder to {target} (nothing uploaded).")
            return str(target)
        url = hub.push_to_hub(
            folder,
            args.hub_model_id,
            token=args.hub_token,
            private=args.hub_private_repo,
            commit_message=args.commit_message or f"Upload {Path(args.folder).name} (diffusers-tread)",
            space_id=args.space_id,
            demo_url=args.demo_url,
            eval_results=eval_results,
            info=info,
        )
    logger.info(f"Pushed to {url}")
    return url


if __name__ == "__main__":
    main_with_messages(lambda: main(sys.argv[1:]))
