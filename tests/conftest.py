"""Shared fixtures: tiny models, a stock-DiT twin, and a simulated Hub (no network)."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "PYTEST_XDIST_WORKER" in os.environ:
    # `pytest -n 2` (the README's command) on 2 cores: one intra-op thread per worker and per process it starts, or
    # every small op waits for a thread the other worker's load has descheduled. Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import write_basic_config  # noqa: E402
from diffusers import DiTTransformer2DModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from diffusers_tread import TreadTransformer2DModel  # noqa: E402

TINY_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=6,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)
TREAD_ONLY_KEYS = ("routes", "route_reinsertion", "shared_conditioning")


def tiny_tread(seed: int = 0, **overrides) -> TreadTransformer2DModel:
    torch.manual_seed(seed)
    return TreadTransformer2DModel(**{**TINY_CONFIG, **overrides})


def stock_twin(model: TreadTransformer2DModel) -> DiTTransformer2DModel:
    """A stock DiTTransformer2DModel with the same config and weights (the independent reference)."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_") and k not in TREAD_ONLY_KEYS}
    stock = DiTTransformer2DModel(**config)
    stock.load_state_dict(model.state_dict())
    return stock.train(model.training)


def tiny_inputs(batch_size: int = 3, seed: int = 0, model=None):
    config = model.config if model is not None else TINY_CONFIG
    size, channels = config["sample_size"], config["in_channels"]
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch_size, channels, size, size, generator=generator)
    timestep = torch.randint(0, 1000, (batch_size,), generator=generator)
    class_labels = torch.randint(0, config["num_embeds_ada_norm"], (batch_size,), generator=generator)
    return hidden_states, timestep, class_labels


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "training" / "train_tread.py"
# 8x8 digits (native size), the 8-block width-64 preset: a few seconds per run on 2 CPU cores.
TINY = [
    "--resolution=8",
    "--train_batch_size=16",
    "--report_to=none",
    "--num_validation_images=1",
    "--validation_num_inference_steps=2",
    "--validation_class_labels=0,1",
    "--dataloader_num_workers=0",
]


@pytest.fixture(autouse=True)
def isolated_working_directory(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh, empty working directory, so default relative paths (``--output_dir tread-digits``)
    never meet what a user ran before in the checkout (the README's quick start writes ``tread-digits/`` there)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Bench scripts run in-process set torch's intra-op thread count: it must not leak into the next test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def accelerate_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("accelerate") / "default_config.yaml"
    write_basic_config(mixed_precision="no", save_location=str(path))
    return str(path)


def free_port() -> int:
    """A port no other process listens on: concurrent multi-process launches (pytest -n) must not share one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches reset and its counters (graph breaks, graphs) cleared before and after a test."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def launch(accelerate_config, *args, num_processes=1):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = ["accelerate", "launch", "--config_file", accelerate_config, "--num_processes", str(num_processes)]
    command += [f"--main_process_port={free_port()}"]
    result = subprocess.run(
        [*command, str(SCRIPT), *TINY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def load_module(path, name: str | None = None, register: bool = False) -> types.ModuleType:
    """Import the script at ``path`` (scripts are files, not packages) as module ``name`` (default: the file's stem),
    as ``python path`` would run it: with its own folder first on ``sys.path`` while its top-level code runs (so a
    bench script's ``from official_tread import ...`` works). ``register`` also puts it in ``sys.modules`` (which
    dataclasses look their module up in); the caller removes it."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[spec.name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def load_script():
    return load_module(SCRIPT)


def transformer_weights(folder):
    return load_file(Path(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def tiny_vae(**overrides):
    """A random AutoencoderKL with one 2x downsampling: 3x16x16 images <-> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    return AutoencoderKL(**{**config, **overrides})


class FakeHub:
    """Serves local folders as Hub repos by patching the functions Diffusers' ``download`` calls.

    Like the real client, single-file downloads land in a cache folder and ``snapshot_download`` fills it, so
    Diffusers runs its whole download path (including the library check that rejects unknown packages).
    """

    def __init__(self, cache: Path):
        self.cache = cache
        self.repos: dict[str, Path] = {}
        self.calls: list[tuple[str, str]] = []

    def add(self, repo_id: str, folder) -> None:
        self.repos[repo_id] = Path(folder)

    def _folder(self, repo_id):
        if repo_id not in self.repos:
            raise AssertionError(f"unexpected Hub repo {repo_id}")
        return self.repos[repo_id]

    def model_info(self, repo_id, **kwargs):
        self.calls.append(("model_info", repo_id))
        folder = self._folder(repo_id)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        return types.SimpleNamespace(
            siblings=[types.SimpleNamespace(rfilename=f) for f in files], sha="0" * 40, id=repo_id
        )

    def hf_hub_download(self, repo_id, filename, **kwargs):
        self.calls.append(("hf_hub_download", repo_id))
        subfolder = kwargs.get("subfolder")
        relative = f"{subfolder}/{filename}" if subfolder else filename
        source = self._folder(repo_id) / relative
        if not source.exists():
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(f"{relative} not in {repo_id}")
        target = self.cache / repo_id / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)

    def snapshot_download(self, repo_id, **kwargs):
        self.calls.append(("snapshot_download", repo_id))
        target = self.cache / repo_id
        shutil.copytree(self._folder(repo_id), target, dirs_exist_ok=True)
        return str(target)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    hub = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(pipeline_utils, "model_info", hub.model_info)
    monkeypatch.setattr(pipeline_utils, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(pipeline_utils, "snapshot_download", hub.snapshot_download)
    return hub
