"""Benchmark the official TREAD code (CompVis/tread) the way our own bench scripts measure ours.

Nothing of the official code is copied here: it is imported at run time from a checkout the user passes in
(``--official_tread PATH``, e.g. ``git clone https://github.com/CompVis/tread``). Its ``dit.py`` builds the DiT from
timm layers, and importing ``timm.models`` imports torchvision; where torchvision is not importable (a CPU-only venv
without it), a stand-in that hands out inert placeholders is installed for the duration of that import only.

Per model it reports the ATen ops of one forward and of one full training step (forward + loss + backward + AdamW),
dense and routed, counted with a ``TorchDispatchMode``, and the median wall time of eager steps, dense and routed
interleaved. Two losses: ``edm``, the official objective (EDM preconditioning and loss weighting, what the official
``train.py`` runs), and ``mse``, plain MSE against an 8-channel target, the step ``bench/throughput.py`` times for our
model (so the two op counts compare the backbones only). Measured for DiT-S/2 at batch 2 (route 2..8 at 0.5, foreach
AdamW): 595 ops per dense forward (605 routed); per step 2063 dense / 2078 routed with ``mse``, 2113 / 2128 with ``edm``.
Needs timm (1.0.31 tested) importable; torchvision is optional.

    python bench/official_tread.py --official_tread /tmp/official-tread --models DiT-S/2 --batch_size 2
    python bench/official_tread.py --official_tread ~/tread --models DiT-B/2 --routes 2:8:0.5 --json out.json

Other bench scripts import it the way ``bench/memory.py`` imports ``throughput``: ``from official_tread import ...``
(the script's folder is ``sys.path[0]`` when run as ``python bench/x.py``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from diffusers_tread.profiling import count_aten_ops  # also bench/throughput.py's and the tests' op counter

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# The official EDM settings: EDMDiffusion's defaults (edm.py, `EDMDiffusion.__init__`, line 90), which
# configs/config.yaml (`train.diffuser: edm.EDMDiffusion`) does not override.
EDM_P_MEAN = -1.2
EDM_P_STD = 1.2
EDM_SIGMA_DATA = 0.5
# configs/config.yaml `train.general.class_drop_prob` (line 18): label dropout for classifier-free guidance.
OFFICIAL_CLASS_DROP_PROB = 0.1


# --------------------------------------------------------------------------------------------------------------------
# A stand-in for torchvision, for importing timm where torchvision is missing or broken
# --------------------------------------------------------------------------------------------------------------------


class _PlaceholderMeta(type):
    """Any public attribute of a placeholder class is another placeholder class (so `a.b.c` resolves)."""

    def __getattr__(cls, item: str) -> type:
        if item.startswith("__"):
            raise AttributeError(item)
        return _placeholder(f"{cls.__name__}.{item}")


class _Placeholder(metaclass=_PlaceholderMeta):
    """Inert stand-in for anything torchvision exports: a real class (usable as a base class and in isinstance, which
    is then always False), constructible with any arguments, callable, iterable as empty."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, item: str) -> type:
        if item.startswith("__"):
            raise AttributeError(item)
        return _placeholder(f"{type(self).__name__}.{item}")

    def __call__(self, *args: Any, **kwargs: Any) -> _Placeholder:
        return self

    def __iter__(self) -> Iterator[Any]:
        return iter(())


def _placeholder(name: str) -> type:
    return _PlaceholderMeta(name, (_Placeholder,), {})


class TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta-path finder that serves ``torchvision`` and every ``torchvision.*`` submodule as an empty package whose
    public attributes are placeholders. timm only needs torchvision's names at import time (e.g. ``from
    torchvision.ops.misc import FrozenBatchNorm2d`` in timm/layers/create_norm.py), never for the DiT layers."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = ModuleType(spec.name)
        module.__path__ = []  # a package, so submodule imports come back to this finder

        def module_getattr(item: str) -> type:
            if item.startswith("__"):
                raise AttributeError(item)
            return _placeholder(f"{spec.name}.{item}")

        module.__getattr__ = module_getattr  # PEP 562
        return module

    def exec_module(self, module: ModuleType) -> None:
        pass


def torchvision_importable() -> bool:
    """Whether the real torchvision imports (the CUDA wheels on a CPU-only machine fail with an OSError)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def _torchvision_modules() -> list[str]:
    return [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]


@contextlib.contextmanager
def torchvision_stub() -> Iterator[TorchvisionStub]:
    """Serve ``torchvision.*`` from a :class:`TorchvisionStub` inside the block. Torchvision modules already loaded
    (e.g. left half-imported by a broken install) are set aside for the block; on exit the finder and every module it
    made are removed and those restored, so ``import torchvision`` behaves as before (modules imported meanwhile, like
    timm, keep their placeholders)."""
    stub = TorchvisionStub()
    set_aside = {name: sys.modules.pop(name) for name in _torchvision_modules()}
    sys.meta_path.insert(0, stub)
    try:
        yield stub
    finally:
        sys.meta_path.remove(stub)
        for name in _torchvision_modules():
            if getattr(getattr(sys.modules[name], "__spec__", None), "loader", None) is stub:
                del sys.modules[name]
        sys.modules.update(set_aside)


# --------------------------------------------------------------------------------------------------------------------
# Loading and running the official model
# --------------------------------------------------------------------------------------------------------------------

# Classes of the official dit.py whose `forward` is decorated with @torch.compile (dit.py lines 99 and 133).
_COMPILED_CLASSES = ("TransformerBlock", "FinalLayer")
_LOAD_COUNT = itertools.count()


def load_official_dit(checkout: str | Path, eager: bool = True) -> ModuleType:
    """Import the official ``dit.py`` (and its ``routing_module.py``) from a CompVis/tread checkout.

    ``eager=True`` undoes the ``@torch.compile`` on ``TransformerBlock.forward`` and ``FinalLayer.forward`` (each
    compiled forward keeps the original function as ``_torchdynamo_orig_callable``), so the model runs op by op like
    ours does in eager mode; ``eager=False`` keeps them compiled, as the official code ships. Each call imports a fresh
    copy under its own module name, so an eager and a compiled copy can live side by side; ``sys.path`` and
    ``sys.modules['routing_module']`` are restored afterwards.
    """
    root = Path(checkout).expanduser().resolve()
    path = root / "dit.py"
    if not path.is_file() or not (root / "routing_module.py").is_file():
        raise FileNotFoundError(f"{root} is not a CompVis/tread checkout (no dit.py / routing_module.py)")
    name = f"official_tread_dit_{'eager' if eager else 'compiled'}_{next(_LOAD_COUNT)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the usual recipe: what inspect.getmodule and pickle look up
    saved_path = list(sys.path)
    saved_router = sys.modules.pop("routing_module", None)
    stub = contextlib.nullcontext() if torchvision_importable() else torchvision_stub()
    try:
        sys.path.insert(0, str(root))  # dit.py does `from routing_module import Router` (line 10)
        with stub:
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path[:] = saved_path
        sys.modules.pop("routing_module", None)
        if saved_router is not None:
            sys.modules["routing_module"] = saved_router
    if eager:
        for cls_name in _COMPILED_CLASSES:
            cls = getattr(module, cls_name)
            cls.forward = getattr(cls.forward, "_torchdynamo_orig_callable", cls.forward)
    return module


def official_model(
    module: ModuleType,
    name: str,
    routes: list[dict] | None,
    learn_sigma: bool = True,
    num_classes: int = 1000,
    input_size: int = 32,
    in_channels: int = 4,
) -> torch.nn.Module:
    """The official DiT ``name`` (e.g. "DiT-S/2") in train mode; routing on when ``routes`` is given.

    Routes use the official keys (``start_layer_idx``, ``end_layer_idx``, ``selection_ratio``: the fraction of tokens
    that *skip* the route, routing_module.py line 10), as configs/model/tread.yaml writes them. The official configs
    leave ``learn_sigma`` at dit.py's default False (4 output channels); True gives the 8 output channels of our
    DiT and of facebookresearch/DiT. The model is called as ``model(x, t, y, class_drop_prob=...)`` and returns the
    output tensor (dit.py line 263), not a dict (the ``Dict`` annotation on its forward is wrong).
    """
    return module.DiT_models[name](
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        cond_mode="adaln",  # configs/model/*.yaml
        enable_routing=bool(routes),
        routes=routes,
    ).train()


def official_optimizer(model: torch.nn.Module, foreach: bool | None = True) -> torch.optim.AdamW:
    """AdamW as configs/config.yaml `train.optimizer` (lines 23-28) sets it: lr 1e-4, betas (0.9, 0.999), eps 1e-8,
    weight decay 0 (torch's AdamW default is 0.01). ``foreach=True`` is what torch picks on CUDA (the official runs);
    on the CPU torch would otherwise step each parameter in a Python loop, ~900 more ATen ops for DiT-S/2."""
    return torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=foreach
    )


def edm_sigma_and_noise(batch: Batch, in_channels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample EDM noise level and unit noise, derived deterministically from the bench batch.

    The official loss draws ``log(sigma) ~ N(P_mean, P_std^2)`` and the noise with ``randn`` (edm.py lines 112-115).
    Here the normal draw is the standard-normal quantile of the integer timestep's bin, ``ndtri((t + 0.5) / 1000)``,
    so timesteps spread over 0..999 give the same log-normal sigma distribution; the unit noise is the first
    ``in_channels`` channels of the batch's Gaussian target.
    """
    latents, target, timestep, _ = batch
    normal = torch.special.ndtri((timestep + 0.5) / 1000.0).to(latents.dtype)  # long + float -> float32: no copy
    sigma = (normal * EDM_P_STD + EDM_P_MEAN).exp().reshape(-1, 1, 1, 1)
    return sigma, target[:, :in_channels]


def edm_loss(model: torch.nn.Module, batch: Batch, class_drop_prob: float = OFFICIAL_CLASS_DROP_PROB) -> torch.Tensor:
    """The official training loss: EDM preconditioning around the DiT and the EDM loss weighting (Karras et al.
    2022, Table 1), as edm.py `EDMPrecond.forward` (lines 68-84) and `EDMDiffusion.get_training_loss` (lines
    111-118) compute them, averaged over everything as train.py line 201 does. No auxiliary TREAD loss: the official
    training has none. With ``learn_sigma=True`` the official preconditioning would not broadcast (8 output channels
    vs 4 input channels); then the first ``in_channels`` output channels are used (DiT's [prediction, variance] split).
    """
    latents, _, _, labels = batch
    sigma, unit_noise = edm_sigma_and_noise(batch, model.in_channels)
    sd2 = EDM_SIGMA_DATA**2
    noisy = latents + unit_noise * sigma
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * EDM_SIGMA_DATA / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = sigma.log().flatten() / 4  # the DiT's "timestep" is this float, not the integer timestep
    raw = model(c_in * noisy, c_noise, labels, class_drop_prob=class_drop_prob)
    if raw.shape[1] != model.in_channels:
        raw = raw[:, : model.in_channels]
    denoised = c_skip * noisy + c_out * raw
    weight = (sigma**2 + sd2) / (sigma * EDM_SIGMA_DATA) ** 2
    return (weight * (denoised - latents) ** 2).mean()


def mse_loss(model: torch.nn.Module, batch: Batch, class_drop_prob: float = 0.0) -> torch.Tensor:
    """Plain MSE of the raw output against the batch target, the step bench/throughput.py times for our model (the
    integer timestep goes in as is; label dropout off, dit.py's forward default)."""
    latents, target, timestep, labels = batch
    prediction = model(latents, timestep, labels, class_drop_prob=class_drop_prob)
    if target.shape[1] != prediction.shape[1]:  # learn_sigma=False: the first 4 target channels
        target = target[:, : prediction.shape[1]]
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"edm": edm_loss, "mse": mse_loss}


def official_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    loss: str = "edm",
    class_drop_prob: float | None = None,
) -> torch.Tensor:
    """One training step as the official train.py loop runs it (lines 194-205): loss, ``zero_grad``, backward,
    ``optimizer.step``. ``batch`` is ``(latents [B,4,H,W], target [B,8,H,W], timestep [B] long, labels [B] long)``.

    ``loss="edm"`` is the official objective (:func:`edm_loss`; its sigma and noise come from the batch, see
    :func:`edm_sigma_and_noise`, label dropout 0.1 as configured); ``loss="mse"`` is :func:`mse_loss`. Left out of
    the official loop: the EMA update and ``loss.item()`` (train.py lines 207-209), and ``accelerator.autocast``
    (fp32 unless accelerate is configured for mixed precision). Label dropout and the routing mask draw from torch's
    global RNG inside the official model. Returns the loss, detached.
    """
    kwargs = {} if class_drop_prob is None else {"class_drop_prob": class_drop_prob}
    value = LOSSES[loss](model, batch, **kwargs)
    optimizer.zero_grad()  # the official order: zero_grad, backward, step
    value.backward()
    optimizer.step()
    return value.detach()


# --------------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------------


def make_batch(batch_size: int, device: torch.device, seed: int = 0, input_size: int = 32) -> Batch:
    """The same draws as bench/throughput.py's ``make_batch`` (fp32): latents, 8-channel target, timestep, label."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, 4, input_size, input_size, generator=generator)
    target = torch.randn(batch_size, 8, input_size, input_size, generator=generator)
    timestep = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = torch.randint(0, 1000, (batch_size,), generator=generator)
    return latents.to(device), target.to(device), timestep.to(device), labels.to(device)


def parse_routes(text: str, depth: int) -> list[dict]:
    """'paper' -> the paper's route 2..depth-4 at 0.5; '2:8:0.5,10:12:0.3' -> route dicts."""
    if text == "paper":
        return [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": depth - 4}]
    routes = []
    for part in text.split(","):
        start, end, ratio = part.split(":")
        routes.append({"selection_ratio": float(ratio), "start_layer_idx": int(start), "end_layer_idx": int(end)})
    return routes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_official(module: ModuleType, name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Op counts and interleaved median step times of the official model ``name``, dense and routed."""
    torch.manual_seed(0)
    dense = official_model(module, name, None, learn_sigma=args.learn_sigma).to(device)
    routes = parse_routes(args.routes, len(dense.blocks))
    routed = official_model(module, name, routes, learn_sigma=args.learn_sigma).to(device)
    routed.load_state_dict(dense.state_dict())
    arms = {"dense": dense, "routed": routed}
    optimizers = {arm: official_optimizer(model, foreach=args.foreach) for arm, model in arms.items()}
    batch = make_batch(args.batch_size, device)
    result: dict[str, Any] = {"model": name, "routes": routes, "batch_size": args.batch_size}
    result["parameters"] = sum(p.numel() for p in dense.parameters() if p.requires_grad)
    latents, _, timestep, labels = batch
    for arm, model in arms.items():
        # One forward as the reference counts it: train mode, autograd on, label dropout off (dit.py's default).
        forward = count_aten_ops(lambda m=model: m(latents, timestep, labels))
        result[f"{arm}_forward_ops"] = sum(forward.values())
    for loss in args.losses:
        for arm, model in arms.items():
            official_train_step(model, optimizers[arm], batch, loss)  # AdamW's first step creates its state
            counts = count_aten_ops(lambda m=model, a=arm, lo=loss: official_train_step(m, optimizers[a], batch, lo))
            result[f"{loss}_{arm}_step_ops"] = sum(counts.values())
            result[f"{loss}_{arm}_step_counts"] = dict(sorted(counts.items()))
        for arm in arms:
            for _ in range(args.warmup):
                official_train_step(arms[arm], optimizers[arm], batch, loss)
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both arms alike
            for arm, model in arms.items():
                _synchronize(device)
                start = time.perf_counter()
                official_train_step(model, optimizers[arm], batch, loss)
                _synchronize(device)
                times[arm].append(time.perf_counter() - start)
        for arm in arms:
            result[f"{loss}_{arm}_median_s"] = statistics.median(times[arm])
        result[f"{loss}_time_ratio"] = result[f"{loss}_routed_median_s"] / result[f"{loss}_dense_median_s"]
    return result


def _op_delta(result: dict, loss: str) -> str:
    """The ops the routed step has more (+) or fewer (-) of than the dense step."""
    dense = collections.Counter(result[f"{loss}_dense_step_counts"])
    routed = collections.Counter(result[f"{loss}_routed_step_counts"])
    more, fewer = routed - dense, dense - routed
    parts = [f"+{n} {op}" for op, n in sorted(more.items())] + [f"-{n} {op}" for op, n in sorted(fewer.items())]
    return ", ".join(parts) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_tread", required=True, help="path of a CompVis/tread checkout")
    parser.add_argument("--models", nargs="+", default=["DiT-S/2"])
    parser.add_argument("--routes", default="paper", help="start:end:ratio[,start:end:ratio]; 'paper' = 2..depth-4")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=["edm", "mse"])
    parser.add_argument("--learn_sigma", type=int, choices=[0, 1], default=1, help="8 output channels (default 1)")
    parser.add_argument("--foreach", type=int, choices=[0, 1], default=1, help="foreach AdamW, as torch on CUDA")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="keep the official @torch.compile (default: eager)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.learn_sigma, args.foreach = bool(args.learn_sigma), bool(args.foreach)

    device = torch.device(args.device)
    module = load_official_dit(args.official_tread, eager=not args.compiled)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"# official CompVis/tread from {args.official_tread}; device={device} ({machine}), "
        f"threads={torch.get_num_threads()}, fp32, torch={torch.__version__}, "
        f"{'compiled blocks' if args.compiled else 'eager'}, learn_sigma={args.learn_sigma}, "
        f"AdamW foreach={args.foreach}"
    )
    results = [bench_official(module, name, args, device) for name in args.models]
    print(
        "| model | route | batch | loss | fwd ops dense / routed | step ops dense / routed "
        "| median step ms dense / routed | routed/dense time |"
    )
    print("|" + "---|" * 8)
    for r in results:
        route = ",".join(f"{x['start_layer_idx']}..{x['end_layer_idx']}@{x['selection_ratio']}" for x in r["routes"])
        for loss in args.losses:
            print(
                f"| {r['model']} | {route} | {r['batch_size']} | {loss} | {r['dense_forward_ops']} / "
                f"{r['routed_forward_ops']} | {r[f'{loss}_dense_step_ops']} / {r[f'{loss}_routed_step_ops']} | "
                f"{1e3 * r[f'{loss}_dense_median_s']:.1f} / {1e3 * r[f'{loss}_routed_median_s']:.1f} | "
                f"{r[f'{loss}_time_ratio']:.3f} |"
            )
    for r in results:
        for loss in args.losses:
            print(f"# {r['model']} {loss}: routed step vs dense step: {_op_delta(r, loss)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
