"""One process of tests/test_fsdp.py: a routed TREAD training step under FSDP2 (``fully_shard``, gloo, CPU) against
the same step on an unsharded copy, then the full-weight save and load paths. Writes its findings to
``<out>/rank<r>.json``; the test reads them. Run by the test as ``python fsdp_worker.py <out>`` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set."""

from __future__ import annotations

import copy
import faulthandler
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from diffusers.training_utils import EMAModel
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from diffusers_tread import TreadTransformer2DModel
from diffusers_tread.objectives import get_objective
from diffusers_tread.sharding import (
    fully_shard_model,
    gather_full_ema_state_dict,
    gather_full_state_dict,
    is_sharded,
    load_full_state_dict,
    save_full_pretrained,
    shard_ema_like,
)
from diffusers_tread.training_utils import RunState, tread_training_loss

CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=6,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
    routes=[{"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.5}],
)
BATCH = 4
SCRIPT = Path(__file__).parents[1] / "training" / "train_tread.py"


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s data (different on each rank, as data parallelism gives)."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(BATCH, 4, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def step_loss(model, objective, rank: int) -> torch.Tensor:
    x0, labels = batch(rank)
    generator = torch.Generator().manual_seed(rank)  # each rank's training generator: noise, timesteps, routes
    return tread_training_loss(model, objective, x0, labels, generator=generator, patch_size=2)


def blocks_only_error() -> str | None:
    """Shard the blocks only (the README's old recipe): the final layer calls block 0's embedder outside its forward.
    Returns the error, or None if the step ran."""
    torch.manual_seed(0)
    model = TreadTransformer2DModel(**CONFIG).train()
    for block in model.transformer_blocks:
        fully_shard(block)
    fully_shard(model)
    try:
        step_loss(model, get_objective("ddpm"), dist.get_rank()).backward()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


def max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class ProcessGroupAccelerator:
    """What training/train_tread.py's weight hooks and final save use of accelerate's ``Accelerator``, over the
    torch.distributed group (accelerate's FSDP does not engage on CPU, so its ``save_state`` cannot be run here: the
    hooks are called as ``save_state`` / ``load_state`` call them)."""

    def __init__(self):
        self.process_index = dist.get_rank()
        self.num_processes = dist.get_world_size()
        self.is_main_process = self.process_index == 0
        self.device = torch.device("cpu")
        self.trackers = []
        self.save_hooks, self.load_hooks = [], []

    def unwrap_model(self, model):
        return model

    def prepare(self, *objects):  # the model is sharded already, as accelerate's FSDP2 prepare leaves it
        return objects

    def register_save_state_pre_hook(self, hook):
        self.save_hooks.append(hook)

    def register_load_state_pre_hook(self, hook):
        self.load_hooks.append(hook)

    def save_state(self, folder: str) -> None:
        for hook in self.save_hooks:
            hook([self.model], [], folder)

    def load_state(self, folder: str) -> None:
        for hook in self.load_hooks:
            hook([self.model], folder)


def train_step(model, ema, objective, rank: int) -> None:
    step_loss(model, objective, rank).backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    ema.step(model.parameters())


def script_paths(out: Path) -> dict:
    """The training script's checkpoint hooks, resume and final save on a sharded model and its sharded EMA, against
    the same on an unsharded twin (the reference computes every rank's gradient and averages, as data parallelism)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    PartialState()  # the script logs through accelerate's logger; this process group is already up
    spec = importlib.util.spec_from_file_location("train_tread", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = out / "run"
    argv = [f"--output_dir={run}", "--resolution=8", "--report_to=none", "--ema_decay=0.9", "--train_batch_size=4"]
    args = script.parse_args(argv)
    args.num_validation_images, args.validation_num_inference_steps, args.validation_class_labels = 1, 2, "0,1"
    objective = get_objective(args.objective)
    found = {}

    torch.manual_seed(0)
    model = TreadTransformer2DModel(**CONFIG).train()
    reference = copy.deepcopy(model)
    ema, reference_ema = script.build_ema(args, model), script.build_ema(args, reference)
    data = script.TrainingData(list(range(8)), {i: str(i) for i in range(10)}, "random tensors", None, 4, 8)
    accelerator = ProcessGroupAccelerator()
    fully_shard_model(model)
    script.prepare_optimization(args, accelerator, model, ema, data)  # shards the EMA like the model
    found["ema_sharded"] = all(type(shadow).__name__ == "DTensor" for shadow in ema.shadow_params)
    try:
        lora_args = script.parse_args(argv)
        lora_args.lora_rank = 4  # (parse_args also wants a checkpoint to fine-tune; the refusal comes after it)
        script.prepare_optimization(lora_args, accelerator, model, None, data)
    except ValueError as error:
        found["lora_refused"] = str(error)
    train_step(model, ema, objective, rank)
    for r in range(world):
        (step_loss(reference, objective, r) / world).backward()
    torch.optim.AdamW(reference.parameters(), lr=1e-2).step()
    reference_ema.step(reference.parameters())
    reference_ema_weights = copy.deepcopy(reference)
    reference_ema.copy_to(reference_ema_weights.parameters())

    accelerator.model = model
    script.register_weight_hooks(accelerator, args, torch.Generator().manual_seed(rank), ema)
    checkpoint = run / "checkpoint-1"
    accelerator.save_state(str(checkpoint))
    dist.barrier()
    saved = TreadTransformer2DModel.from_pretrained(checkpoint / "transformer")
    found["checkpoint_error"] = max_error(saved.state_dict(), reference.state_dict())
    saved_ema = EMAModel.from_pretrained(str(checkpoint / "transformer_ema"), TreadTransformer2DModel)
    found["checkpoint_ema_error"] = max(
        (a - b).abs().max().item() for a, b in zip(saved_ema.shadow_params, reference_ema.shadow_params, strict=True)
    )
    found["checkpoint_ema_step"] = saved_ema.optimization_step

    # Resume into a fresh sharded model and EMA; the next step matches the reference's next step.
    torch.manual_seed(1)
    resumed = TreadTransformer2DModel(**CONFIG).train()
    resumed_ema = script.build_ema(args, resumed)
    fully_shard_model(resumed)
    shard_ema_like(resumed_ema, resumed)
    accelerator = ProcessGroupAccelerator()
    accelerator.model = resumed
    script.register_weight_hooks(accelerator, args, torch.Generator(), resumed_ema)
    accelerator.load_state(str(checkpoint))
    found["resumed_ema_step"] = resumed_ema.optimization_step
    full_resumed = gather_full_state_dict(resumed)
    full_resumed_ema = gather_full_ema_state_dict(resumed_ema, resumed)
    if rank == 0:
        found["resumed_error"] = max_error(full_resumed, reference.state_dict())
        found["resumed_ema_error"] = max_error(full_resumed_ema, reference_ema_weights.state_dict())

    # The final save: the pipeline holds the EMA weights, whole.
    final_model, final_ema = script.main_process_weights(accelerator, resumed, resumed_ema)
    found["final_is_ordinary"] = final_model is None or not is_sharded(final_model)
    if rank == 0:
        state = RunState(args=args, argv=[], accelerator=accelerator, repo_id=None, started=time.time(), data=data)
        script.save_final_pipeline(state, final_model, final_ema, objective, 1, 1.0)
    dist.barrier()
    final = TreadTransformer2DModel.from_pretrained(run / "transformer")
    found["final_error"] = max_error(final.state_dict(), reference_ema_weights.state_dict())
    found["final_grid"] = (run / "samples" / "final_grid.png").is_file()
    return found


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    objective = get_objective("ddpm")
    result = {}

    torch.manual_seed(0)
    model = TreadTransformer2DModel(**CONFIG).train()
    reference = copy.deepcopy(model)  # unsharded, same weights
    ema = EMAModel(model.parameters(), decay=0.9, min_decay=0.9, use_ema_warmup=False, foreach=True)
    reference_ema = EMAModel(reference.parameters(), decay=0.9, min_decay=0.9, use_ema_warmup=False, foreach=True)

    # Reference: the data-parallel step on one unsharded model, the mean of every rank's loss gradient.
    reference_losses = []
    for r in range(world):
        loss = step_loss(reference, objective, r)
        (loss / world).backward()
        reference_losses.append(loss.item())
    reference_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}

    fully_shard_model(model)
    shard_ema_like(ema, model)
    result["sharded"] = is_sharded(model) and not is_sharded(reference)
    result["dtensor_parameters"] = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    result["parameters"] = len(list(model.parameters()))

    # The routed forward really routes under FSDP2 (parameters are unsharded inside forward).
    x0, labels = batch(rank)
    with torch.no_grad():
        inputs = objective.training_inputs(x0, generator=torch.Generator().manual_seed(7))
        kwargs = dict(timestep=inputs.timestep, class_labels=labels)
        routed = model(inputs.model_input, route_generator=torch.Generator().manual_seed(8), **kwargs)
        expected = reference(inputs.model_input, route_generator=torch.Generator().manual_seed(8), **kwargs)
    result["route_masks"] = [int(mask.sum()) for mask in routed.route_masks]
    result["routed_forward_error"] = (routed.sample - expected.sample).abs().max().item()

    loss = step_loss(model, objective, rank)
    loss.backward()
    result["loss"] = loss.item()
    result["reference_loss"] = reference_losses[rank]
    sharded_grads = {name: full(p.grad) for name, p in model.named_parameters()}
    result["grad_error"] = max_error(sharded_grads, reference_grads)
    result["grad_scale"] = max(g.abs().max().item() for g in reference_grads.values())

    # One optimizer step and two EMA updates on each, then the full weights.
    for m in (model, reference):
        torch.optim.AdamW(m.parameters(), lr=1e-2).step()
    for _ in range(2):
        ema.step(model.parameters())
        reference_ema.step(reference.parameters())
    state = gather_full_state_dict(model)
    ema_state = gather_full_ema_state_dict(ema, model)
    if rank == 0:
        result["state_error"] = max_error(state, reference.state_dict())
        reference_ema.store(reference.parameters())
        reference_ema.copy_to(reference.parameters())
        result["ema_error"] = max_error(ema_state, reference.state_dict())
        reference_ema.restore(reference.parameters())
        save_full_pretrained(model, state, out / "transformer")
    else:
        result["empty_elsewhere"] = not state and not ema_state
    dist.barrier()

    # Every process loads the saved folder as an ordinary model, and back into a fresh sharded model.
    loaded = TreadTransformer2DModel.from_pretrained(out / "transformer")
    result["saved_class"] = json.loads((out / "transformer" / "config.json").read_text())["_class_name"]
    result["saved_routes"] = loaded.config.routes
    result["loaded_error"] = max_error(loaded.state_dict(), reference.state_dict())
    torch.manual_seed(1)
    fresh = TreadTransformer2DModel(**CONFIG).train()
    fully_shard_model(fresh)
    load_full_state_dict(fresh, loaded.state_dict())
    result["reloaded_error"] = max_error(
        {name: full(p.detach()) for name, p in fresh.named_parameters()}, dict(reference.named_parameters())
    )
    # DiT's layout (one embedder shared by all blocks) through the same routed step.
    torch.manual_seed(0)
    shared = TreadTransformer2DModel(**CONFIG, shared_conditioning=True).train()
    shared_reference = copy.deepcopy(shared)
    for r in range(world):
        (step_loss(shared_reference, objective, r) / world).backward()
    fully_shard_model(shared)
    step_loss(shared, objective, rank).backward()
    result["shared_grad_error"] = max_error(
        {name: full(p.grad) for name, p in shared.named_parameters()},
        {name: p.grad for name, p in shared_reference.named_parameters()},
    )
    result["blocks_only_error"] = blocks_only_error()

    # bf16 parameters in forward and backward (what accelerate's FSDP2 does with --mixed_precision bf16), fp32 master
    # weights and gradient reduction: the routed step runs, and the saved weights are the fp32 ones.
    torch.manual_seed(0)
    mixed = TreadTransformer2DModel(**CONFIG).train()
    fully_shard_model(mixed, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    mixed_loss = step_loss(mixed, objective, rank)
    mixed_loss.backward()
    result["bf16_loss_rel_error"] = abs(mixed_loss.item() - reference_losses[rank]) / reference_losses[rank]
    result["bf16_grads_finite"] = all(bool(full(p.grad).isfinite().all()) for p in mixed.parameters())
    mixed_state = gather_full_state_dict(mixed)
    result["bf16_saved_dtypes"] = sorted({str(value.dtype) for value in mixed_state.values()})
    result.update(script_paths(out))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # Both ranks past their last collective before either exits; then os._exit, without gloo's teardown (slow, and a
    # rank that tore down while its peer was exiting once died of SIGSEGV in CI).
    dist.barrier()


if __name__ == "__main__":
    faulthandler.enable()  # a crash prints every thread's Python stack into the log the test shows
    main(Path(sys.argv[1]))
    os._exit(0)
