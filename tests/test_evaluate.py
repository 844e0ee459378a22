"""training/evaluate.py and diffusers_tread.metrics: sampling for FID (resumable, deterministic, class-balanced),
the ADM .npz, FID with an injected feature extractor, clear errors for missing files, and Frechet-distance known
answers."""

import os
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, load_module, tiny_tread
from diffusers import DDIMScheduler

from diffusers_tread import TreadDiTPipeline
from diffusers_tread.metrics import (
    ChecksumError,
    feature_statistics,
    frechet_distance,
    load_inception,
    load_reference_statistics,
)

NUM_CLASSES, NUM_SAMPLES, BATCH_SIZE = 10, 20, 8


evaluate = load_module(REPO / "training" / "evaluate.py")


def tiny_features(images: torch.Tensor) -> torch.Tensor:
    """A stand-in for Inception: per-channel mean and std of uint8 (N, 3, H, W) images -> (N, 6)."""
    images = images.double() / 255
    return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A pixel-space RGB pipeline: 3x8x8 images, 10 classes, DDIM."""
    path = tmp_path_factory.mktemp("pipeline")
    transformer = tiny_tread(
        in_channels=3, out_channels=3, routes=[{"start_layer_idx": 1, "end_layer_idx": 4, "selection_ratio": 0.5}]
    )
    TreadDiTPipeline(transformer=transformer, vae=None, scheduler=DDIMScheduler()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference_stats(tmp_path_factory):
    features = tiny_features(torch.randint(0, 256, (50, 3, 8, 8), generator=torch.Generator().manual_seed(1)))
    mu, sigma = feature_statistics(features.numpy())
    path = tmp_path_factory.mktemp("reference") / "reference.npz"
    np.savez(path, mu=mu, sigma=sigma)
    return str(path)


def run(pipeline_dir, output_dir, *extra, feature_extractor=tiny_features):
    argv = ["--pipeline", pipeline_dir, "--output_dir", str(output_dir), "--num_samples", str(NUM_SAMPLES)]
    argv += ["--batch_size", str(BATCH_SIZE), "--num_inference_steps", "2", "--guidance_scale", "2.0", *extra]
    return evaluate.main(evaluate.parse_args(argv), feature_extractor=feature_extractor)


@pytest.fixture(scope="module")
def first_run(pipeline_dir, reference_stats, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("samples")
    labels = []
    original = TreadDiTPipeline.__call__

    def spy(self, class_labels, **kwargs):
        labels.extend(class_labels)
        return original(self, class_labels, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TreadDiTPipeline, "__call__", spy)
        result = run(pipeline_dir, output_dir, "--reference_stats", reference_stats)
    return output_dir, result, labels


def test_samples_npz_and_fid(first_run, reference_stats):
    output_dir, result, labels = first_run
    assert result["written"] == NUM_SAMPLES
    assert sorted(p.name for p in output_dir.glob("*.png")) == [f"{i:06d}.png" for i in range(NUM_SAMPLES)]
    # class-balanced: sample i has class i % num_classes
    assert labels == [i % NUM_CLASSES for i in range(NUM_SAMPLES)]
    assert Counter(labels) == dict.fromkeys(range(NUM_CLASSES), NUM_SAMPLES // NUM_CLASSES)
    # ADM layout: uint8 NHWC under arr_0, in index order
    assert result["npz"].endswith(f"samples_{NUM_SAMPLES}x8x8x3.npz")
    with np.load(result["npz"]) as data:
        assert list(data.keys()) == ["arr_0"]
        samples = data["arr_0"]
    assert samples.dtype == np.uint8 and samples.shape == (NUM_SAMPLES, 8, 8, 3)
    assert samples.std() > 0 and not np.array_equal(samples[0], samples[1])
    features = tiny_features(torch.from_numpy(samples).permute(0, 3, 1, 2)).numpy()
    expected = frechet_distance(*feature_statistics(features), *load_reference_statistics(reference_stats))
    assert result["fid"] == pytest.approx(expected, rel=1e-12) and result["fid"] > 0
    assert (output_dir / "fid.json").exists()


def test_resume_regenerates_only_missing_and_identical(first_run, pipeline_dir):
    output_dir = first_run[0]
    deleted = output_dir / "000009.png"
    original = deleted.read_bytes()
    deleted.unlink()
    others = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in output_dir.glob("*.png")}
    result = run(pipeline_dir, output_dir, "--skip_fid")
    assert result["written"] == 1
    assert deleted.read_bytes() == original
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in others} == others
    assert not list(output_dir.glob("*.tmp*"))
    with pytest.raises(ValueError, match="other settings"):
        run(pipeline_dir, output_dir, "--skip_fid", "--seed", "1")


def test_deterministic_and_seeded_per_sample(first_run, pipeline_dir, tmp_path):
    """A fresh run reproduces every image; a sample is the pipeline's image for its class and per-index seed."""
    run(pipeline_dir, tmp_path, "--skip_fid")
    for index in range(NUM_SAMPLES):
        name = f"{index:06d}.png"
        assert (tmp_path / name).read_bytes() == (first_run[0] / name).read_bytes()
    pipe = TreadDiTPipeline.from_pretrained(pipeline_dir)
    generator = torch.Generator().manual_seed(evaluate.sample_seed(0, 13))
    image = pipe(class_labels=[3], generator=[generator], num_inference_steps=2, guidance_scale=2.0, output_type="np")
    expected = (image.images[0] * 255).round().astype(np.int16)
    with np.load(first_run[1]["npz"]) as data:
        assert np.abs(data["arr_0"][13].astype(np.int16) - expected).max() <= 1  # batch of 8 vs 1: float round-off


def test_process_batches_partition_indices():
    for num_processes in (1, 2, 3):
        batches = [evaluate.process_batches(21, 4, p, num_processes) for p in range(num_processes)]
        indices = sorted(i for process in batches for batch in process for i in batch)
        assert indices == list(range(21))
    assert evaluate.process_batches(21, 4, 1, 2) == [range(4, 8), range(12, 16), range(20, 21)]
    assert (
        len({evaluate.sample_seed(0, i) for i in range(1000)} | {evaluate.sample_seed(1, i) for i in range(1000)})
        == 2000
    )


def test_missing_files_fail_before_sampling(pipeline_dir, reference_stats, tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"inception-2015-12-05\.pt.*nvlabs-fi-cdn"):
        run(pipeline_dir, output_dir, "--reference_stats", reference_stats, feature_extractor=None)
    with pytest.raises(FileNotFoundError, match=r"VIRTUAL_imagenet256_labeled\.npz"):
        run(pipeline_dir, output_dir, "--reference_stats", str(tmp_path / "nope.npz"))
    assert not output_dir.exists()
    not_torchscript = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"weight": torch.zeros(1)}, not_torchscript)
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_inception(not_torchscript)
    no_keys = tmp_path / "images.npz"
    np.savez(no_keys, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="not `mu` and `sigma`"):
        load_reference_statistics(no_keys)


def test_torchscript_extractor(tmp_path):
    class Features(torch.nn.Module):
        def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return images.float().mean(dim=(2, 3))

    path = tmp_path / "features.pt"
    torch.jit.script(Features()).save(str(path))
    extractor = load_inception(path)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    features = extractor(images)
    assert features.dtype == torch.float64 and features.shape == (4, 3)  # grayscale repeated to RGB


def test_inception_file_is_checked_before_it_is_loaded(tmp_path, monkeypatch, caplog):
    """TorchScript runs code when loaded: its SHA-256 must match the one given, else the one recorded on first use."""
    import hashlib

    class Features(torch.nn.Module):
        def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return images.float().mean(dim=(2, 3))

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Features()).save(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: loaded.append(args) or real_load(*args, **kwargs))

    with pytest.raises(ChecksumError, match=f"has SHA-256 {digest}, not {'0' * 64} .*was not loaded"):
        load_inception(path, sha256="0" * 64)
    assert not loaded and not (tmp_path / "inception-2015-12-05.pt.sha256").exists()
    with pytest.raises(ValueError, match="64 hex digits"):
        load_inception(path, sha256="6726825d")
    load_inception(path, sha256=digest.upper())  # given: checked, nothing recorded
    assert len(loaded) == 1 and not (tmp_path / "inception-2015-12-05.pt.sha256").exists()

    with caplog.at_level("WARNING", logger="diffusers_tread.metrics"):
        load_inception(path)  # first use without a hash: recorded, with a warning that names it
    assert f"SHA-256 {digest}, not checked against a known value" in caplog.text
    assert (tmp_path / "inception-2015-12-05.pt.sha256").read_text().split()[0] == digest
    load_inception(path)  # matches the record
    assert len(loaded) == 3

    torch.jit.script(torch.nn.Identity()).save(str(path))  # the file swapped for another
    with pytest.raises(ChecksumError, match=r"not " + digest + r" \(the SHA-256 in .*\.sha256'\)"):
        load_inception(path)
    assert len(loaded) == 3


def test_evaluate_checks_the_inception_hash_before_sampling(pipeline_dir, reference_stats, tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(torch.nn.Identity()).save(str(path))
    output_dir = tmp_path / "out"
    with pytest.raises(ChecksumError, match="was not loaded"):
        run(pipeline_dir, output_dir, "--reference_stats", reference_stats, "--inception_weights", str(path),
            "--inception_sha256", "0" * 64, feature_extractor=None)  # fmt: skip
    assert not output_dir.exists()


# Frechet distance: known answers (numpy.linalg.eigh only; see diffusers_tread/metrics.py).


def test_fd_one_dimensional():
    expected = (1.0 - 3.0) ** 2 + 2.0 + 5.0 - 2 * np.sqrt(2.0 * 5.0)
    assert frechet_distance(np.array([1.0]), np.array([[2.0]]), np.array([3.0]), np.array([[5.0]])) == pytest.approx(
        expected, rel=1e-14
    )


def test_fd_diagonal_and_identical():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    mu, sigma = feature_statistics(rng.normal(size=(100, 8)))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-12)


def test_fd_non_commuting_2x2_closed_form():
    # For 2x2 PSD-similar M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), det(S1 S2) = det S1 det S2.
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[1.5, -0.4], [-0.4, 0.3]])
    trace_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(np.zeros(2), s2, np.zeros(2), s1) == pytest.approx(expected, rel=1e-12)


def test_fd_singular_ill_conditioned():
    """Singular covariances with a 1e-12..1e3 spectrum in a shared random basis (a naive sqrtm of sigma1 @ sigma2
    can go complex or inaccurate here): the exact answer is sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    a, b = np.logspace(-12, 3, 64), np.logspace(3, -12, 64) * rng.uniform(0.5, 2, 64)
    a[:20], b[40:] = 0, 0
    s1, s2 = (basis * a) @ basis.T, (basis * b) @ basis.T
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    # rel 1e-8: eigenvalues near 0 carry ~eps * |sigma| absolute error, which their square roots amplify (scipy
    # 1.17's sqrtm is off by 1.5e-8 here, with a 3e-6 imaginary part).
    assert frechet_distance(np.zeros(64), s1, np.zeros(64), s2) == pytest.approx(expected, rel=3e-8)
    # Fewer samples than dimensions: rank-deficient, identical -> 0, never negative or complex (scipy 1.17's sqrtm
    # gives -4e-6 - 1e-6j here).
    mu, sigma = feature_statistics(rng.normal(size=(10, 64)))
    distance = frechet_distance(mu, sigma, mu, sigma)
    assert isinstance(distance, float) and 0 <= distance < 1e-9


def test_fd_matches_scipy_when_well_conditioned():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    (mu1, s1), (mu2, s2) = (feature_statistics(rng.normal(size=(200, 16)) * scale) for scale in (1.0, 1.5))
    naive = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(naive, rel=1e-8)


def test_fd_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_two_processes_match_one(first_run, pipeline_dir, accelerate_config, tmp_path):
    """accelerate launch with 2 processes writes the same images as one process."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = ["accelerate", "launch", "--config_file", accelerate_config, "--num_processes", "2"]
    command += [f"--main_process_port={free_port()}"]
    args = ["--pipeline", pipeline_dir, "--output_dir", str(tmp_path), "--num_samples", str(NUM_SAMPLES)]
    args += ["--batch_size", str(BATCH_SIZE), "--num_inference_steps", "2", "--guidance_scale", "2.0", "--skip_fid"]
    result = subprocess.run(
        [*command, str(REPO / "training" / "evaluate.py"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for index in range(NUM_SAMPLES):
        name = f"{index:06d}.png"
        assert (tmp_path / name).read_bytes() == (first_run[0] / name).read_bytes()


def test_sparse_guidance_resume_identical(pipeline_dir, tmp_path):
    """Sparse Guidance draws token subsets per batch; batches are fixed, so a regenerated sample is identical."""
    extra = ("--skip_fid", "--guidance", "sparse", "--num_samples", "6", "--batch_size", "3")
    run(pipeline_dir, tmp_path, *extra)
    deleted = tmp_path / "000004.png"
    original = deleted.read_bytes()
    deleted.unlink()
    assert run(pipeline_dir, tmp_path, *extra)["written"] == 1
    assert deleted.read_bytes() == original
