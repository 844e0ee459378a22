"""FID building blocks: Gaussian statistics of features, the Frechet distance, local Inception and reference files.

Nothing here downloads anything. FID needs two local files (see `load_inception` and `load_reference_statistics`):

- an Inception-v3 feature extractor as TorchScript: NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN2-ADA / StyleGAN3
  metrics, also what clean-fid loads), a port of the TensorFlow graph that OpenAI's ADM evaluator and the original
  TTUR FID use. It takes uint8-range ``(N, 3, H, W)`` images, resizes them to 299x299 itself, and returns 2048-d pool
  features with ``return_features=True``;
- reference statistics as ``.npz`` with ``mu`` and ``sigma`` (ADM's ``VIRTUAL_imagenet256_labeled.npz`` has them).

The Inception file is TorchScript, i.e. code that runs when loaded, so it is checked before `torch.jit.load` sees it
(`verify_sha256`). No SHA-256 of ``inception-2015-12-05.pt`` is published: NVIDIA's page, StyleGAN2-ADA / StyleGAN3,
clean-fid 0.1.35 and torch-fidelity 0.4.0 download it without a checksum (the ``6726825d`` in pytorch-fid's and
torch-fidelity's ``*-6726825d.pth`` is the hash prefix of a different file, a state dict). So the hash is either given
(``sha256=`` / ``--inception_sha256``, e.g. from a copy you trust) or recorded on first use, next to the file as
``<file>.sha256``, and every later load must match it. A mismatch raises `ChecksumError` and the file is never loaded.

Any callable ``uint8 (N, 3, H, W) tensor -> (N, D) features`` can replace the Inception network (`FeatureExtractor`).
The Frechet distance uses only ``numpy.linalg.eigh`` (LAPACK's symmetric eigensolver), not ``scipy.linalg.sqrtm``,
whose results for near-singular products differ between SciPy releases.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
logger = logging.getLogger(__name__)

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
REFERENCE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``N - 1``) covariance of ``(N, D)`` features, in float64, as pytorch-fid and ADM."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; round-off negative eigenvalues are clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    ``sigma1 sigma2`` is not symmetric, and a general matrix square root of it (``scipy.linalg.sqrtm``, as pytorch-fid
    and ADM use) can return complex values or lose accuracy when the covariances are singular (fewer samples than
    feature dimensions) or badly conditioned. Here ``tr((sigma1 sigma2)^(1/2)) = tr((A sigma2 A)^(1/2))`` with
    ``A = sigma1^(1/2)``: ``A sigma2 A`` is symmetric PSD and similar to ``sigma1 sigma2``, so the trace is the sum of
    the square roots of its eigenvalues, all from ``numpy.linalg.eigh``, in float64, with no complex parts.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} "
            "(the reference statistics must come from the same feature extractor)."
        )
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(distance, 0.0))


class ChecksumError(ValueError):
    """A file's SHA-256 is not the expected one (it was not loaded)."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, sha256: str | None = None) -> str:
    """Check ``path``'s SHA-256 against ``sha256`` when given, else against the one recorded in ``<path>.sha256``
    (recorded now, with a warning, on first use); return it. `ChecksumError` on a mismatch."""
    record = f"{os.fspath(path)}.sha256"
    if sha256 is not None:
        expected, source = sha256.strip().lower(), "the expected SHA-256 given"
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise ValueError(f"An SHA-256 is 64 hex digits, got {sha256!r}.")
    elif os.path.isfile(record):
        recorded = re.match(r"\s*([0-9a-fA-F]{64})\b", Path(record).read_text())
        expected, source = (recorded.group(1).lower() if recorded else "(unreadable)"), f"the SHA-256 in {record!r}"
    else:
        expected, source = None, None
    actual = file_sha256(path)
    if expected is None:
        try:  # write-then-rename: processes recording at once each write the same value
            with open(f"{record}.tmp{os.getpid()}", "w") as file:
                file.write(f"{actual}  {os.path.basename(path)}\n")
            os.replace(f"{record}.tmp{os.getpid()}", record)
            where = f"recorded in {record!r}; later loads must match it"
        except OSError as error:
            where = f"not recorded ({error})"
        logger.warning(
            "%s has SHA-256 %s, not checked against a known value (none is published for this file; pass one "
            "you trust with --inception_sha256). %s.",
            path,
            actual,
            where[0].upper() + where[1:],
        )
    elif actual != expected:
        raise ChecksumError(
            f"{path!r} has SHA-256 {actual}, not {expected} ({source}): it was not loaded. A TorchScript file runs "
            "code when loaded; get the file again from a source you trust, or, if this file is the one you mean to "
            f"use, pass its hash with --inception_sha256 (or delete {record!r} to record it anew)."
        )
    return actual


class TorchScriptFeatureExtractor:
    """A TorchScript feature network called as ``model(images, return_features=True)`` on uint8 ``(N, 3, H, W)``
    images (NVIDIA's ``inception-2015-12-05.pt``); returns float64 ``(N, D)`` features on the CPU."""

    def __init__(self, model: torch.jit.ScriptModule, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        features = self.model(images.to(self.device), return_features=True)
        return features.reshape(len(images), -1).to("cpu", torch.float64)


def load_inception(
    path: str | os.PathLike | None, device: str | torch.device = "cpu", sha256: str | None = None
) -> TorchScriptFeatureExtractor:
    """Load a local TorchScript Inception (see the module docstring) after checking its SHA-256 (`verify_sha256`:
    against ``sha256``, else the hash recorded on first use); never downloads. pytorch-fid's ``pt_inception-*.pth``
    and torchvision state dicts are not TorchScript and are rejected with an explanation."""
    how = (
        f"Download NVIDIA's TorchScript Inception-v3 `inception-2015-12-05.pt` ({INCEPTION_URL}; the file clean-fid "
        "and StyleGAN2-ADA/StyleGAN3 use) and pass it with --inception_weights PATH."
    )
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found{f' at {path!r}' if path else ''}. {how}")
    verify_sha256(path, sha256)
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise ValueError(
            f"{path!r} is not a TorchScript file (pytorch-fid's pt_inception-2015-12-05-*.pth and torchvision weights "
            f"are state dicts that need torchvision's Inception3 code). {how}"
        ) from error
    return TorchScriptFeatureExtractor(model, device)


def load_reference_statistics(path: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a local ``.npz`` with keys ``mu`` and ``sigma`` (ADM reference batches, pytorch-fid
    ``--save-stats`` files); never downloads."""
    how = (
        "For ImageNet 256x256, download OpenAI's ADM reference batch `VIRTUAL_imagenet256_labeled.npz` "
        f"({REFERENCE_URL}) and pass it with --reference_stats PATH; any .npz with `mu` and `sigma` from the same "
        "Inception network works."
    )
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"Reference statistics not found{f' at {path!r}' if path else ''}. {how}")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path!r} has keys {sorted(data.keys())}, not `mu` and `sigma`. {how}")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def extract_features(images: np.ndarray, extractor: FeatureExtractor, batch_size: int = 200) -> np.ndarray:
    """Features of uint8 NHWC images (as in an ADM ``.npz``), in batches, as a float64 ``(N, D)`` array."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}.")
    features = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        features.append(torch.as_tensor(extractor(batch)).reshape(len(batch), -1).double().cpu().numpy())
    return np.concatenate(features)


def fid_from_images(
    images: np.ndarray,
    extractor: FeatureExtractor,
    reference: tuple[np.ndarray, np.ndarray],
    batch_size: int = 200,
) -> float:
    """FID of uint8 NHWC images against reference ``(mu, sigma)``."""
    mu, sigma = feature_statistics(extract_features(images, extractor, batch_size))
    return frechet_distance(mu, sigma, *reference)
