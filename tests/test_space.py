"""The Gradio demo (spaces/tread-dit): its pieces on a tiny pipeline, and end to end in headless Chromium against the
app served on 127.0.0.1 from a Hub-ready (remote-code) folder, as on a Space. Offline throughout."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import gradio
import pytest
import torch
from conftest import free_port, load_module, tiny_tread
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from huggingface_hub import SpaceCard
from PIL import Image

from diffusers_tread import TreadDiTPipeline, hub
from diffusers_tread.pipelines import pipeline_tread_dit

REPO = Path(__file__).resolve().parent.parent
SPACE = REPO / "spaces" / "tread-dit"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1300",
]
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish", 2: "golden retriever", 3: "tabby, tabby cat"}
KINDS = list(getattr(pipeline_tread_dit, "GUIDANCE_KINDS", ()))


def load_app():
    return load_module(SPACE / "app.py", "tread_space_app")


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """A tiny pixel-space TREAD pipeline, saved as a training output folder and as the folder pushed to the Hub."""
    root = tmp_path_factory.mktemp("space-model")
    transformer = tiny_tread(
        in_channels=3,
        out_channels=None,
        num_embeds_ada_norm=len(ID2LABEL),
        routes=[{"start_layer_idx": 1, "end_layer_idx": 3, "selection_ratio": 0.5}],
        shared_conditioning=True,  # the layout training writes
    )
    TreadDiTPipeline(
        transformer=transformer.eval(), vae=None, scheduler=DDIMScheduler(), id2label=ID2LABEL
    ).save_pretrained(root / "tread-tiny")
    hub.prepare_hub_folder(root / "tread-tiny", root / "hub" / "tread-tiny", repo_id="user/tread-tiny")
    return root / "tread-tiny", root / "hub" / "tread-tiny"


def test_space_folder_is_ready_to_push():
    card = SpaceCard.load(SPACE / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.license == "apache-2.0"
    assert card.data.sdk_version.split(".")[0] == gradio.__version__.split(".")[0]
    lines = (SPACE / "requirements.txt").read_text().splitlines()
    packages = [line.split(">")[0].split("=")[0] for line in lines if line and not line.startswith(("#", "-"))]
    assert {"torch", "diffusers"} <= set(packages) and "diffusers-tread" not in packages  # remote code instead


def test_app_loads_lists_classes_and_passes_the_guidance_through(model_folders):
    library_folder, _ = model_folders
    app = load_app()
    pipe = app.load_pipeline(str(library_folder))
    assert isinstance(pipe, TreadDiTPipeline)
    assert app.class_choices(pipe) == [("tench", 0), ("goldfish", 1), ("golden retriever", 2), ("tabby", 3)]
    assert app.guidance_kinds(pipe) == KINDS

    # The last guidance kind the pipeline offers (e.g. "cfg+sparse"), with both scales, goes through as chosen.
    kind = KINDS[-1] if KINDS else None
    call = {"guidance": kind} if kind else {}
    if kind and "sparse" in kind:
        call["sparse_guidance_scale"] = 1.5
    grid, summary = app.generate(pipe, [1, "2"], kind, 2.0, 1.5, 2, 0, 3)
    assert grid.size == (3 * 96, 2 * 96)  # 8x8 samples shown 12x larger, a row per class
    assert summary.startswith("6 images (2 classes x 3) in **") and "2 steps on CPU, seed 0" in summary
    expected = pipe([1, 1, 1, 2, 2, 2], guidance_scale=2.0, num_inference_steps=2, output_type="pil",
                    generator=torch.Generator().manual_seed(0), **call).images  # fmt: skip
    for index, sample in enumerate(expected):
        row, column = divmod(index, 3)
        cell = grid.crop((column * 96, row * 96, (column + 1) * 96, (row + 1) * 96))
        assert cell.resize((8, 8), Image.NEAREST).tobytes() == sample.convert("RGB").tobytes()

    with pytest.raises(app.gr.Error, match="at least one class"):
        app.generate(pipe, [], None, 2.0, 0.0, 2, 0, 1)
    with pytest.raises(app.gr.Error, match="At most 64 images"):
        app.generate(pipe, [0, 1, 2, 3], None, 2.0, 0.0, 2, 0, 17)
    if KINDS:
        with pytest.raises(app.gr.Error, match="guidance must be one of"):  # the pipeline's own message
            app.generate(pipe, [0], "no-such-guidance", 2.0, 0.0, 2, 0, 1)

    torch.manual_seed(0)
    stock = DiTPipeline(
        transformer=DiTTransformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2),
        vae=None,
        scheduler=DDIMScheduler(),
    )
    assert app.guidance_kinds(stock) == []  # no `guidance=`: classifier-free guidance only, nothing passed


def test_requests_are_bounded_in_seed_size_compute_and_time(model_folders):
    library_folder, _ = model_folders
    app = load_app()
    pipe = app.load_pipeline(str(library_folder))
    # Seeds: 0 .. 2**32 - 1 (a huge one used to end in torch's overflow error); steps and images as the UI allows.
    for seed in (2**64, 10**400, -1, 1.5, float("inf"), float("nan"), "x", None):
        with pytest.raises(app.gr.Error, match=r"seed must be a whole number from 0 to 4294967295"):
            app.generate(pipe, [0], None, 2.0, 0.0, 2, seed, 1)
    for steps in (0, 101):
        with pytest.raises(app.gr.Error, match="number of steps must be a whole number from 1 to 100"):
            app.generate(pipe, [0], None, 2.0, 0.0, steps, 0, 1)
    assert "seed 4294967295" in app.generate(pipe, [0], None, 1.0, 0.0, 1, 2**32 - 1, 1)[1]

    # Compute: images x steps x passes, where classifier-free and Sparse Guidance each add a pass.
    assert [
        app.passes_per_step(*arguments)
        for arguments in [(None, 2.0, 0.0), ("cfg", 1.0, 0.0), ("sparse", 2.0, 0.0), ("sparse", 2.0, 1.0)]
    ] == [2, 1, 2, 1]
    assert app.passes_per_step("cfg+sparse", 2.0, 1.5) == 3 and app.passes_per_step("cfg+sparse", 1.0, 1.0) == 1
    assert app.MAX_EVALUATIONS == 64 * 25 * 2
    with pytest.raises(app.gr.Error, match=r"64 images x 100 steps x 2 model passes per step .* = 12800 evaluations"):
        app.generate(pipe, [0, 1, 2, 3], None, 2.0, 0.0, 100, 0, 16)  # hours on a CPU Space for a real model
    with pytest.raises(app.gr.Error, match=r"limit of 7\. Use fewer images, fewer steps, or guidance scale 1"):
        app.generate(pipe, [0, 1], None, 2.0, 0.0, 2, 0, 1, max_evaluations=7)
    assert app.generate(pipe, [0, 1], None, 2.0, 0.0, 2, 0, 1, max_evaluations=8)[1].startswith("2 images")

    # Time: stopped at the next transformer call after the limit, the hook removed afterwards.
    with pytest.raises(app.gr.Error, match="Stopped after 0 s, this Space's time limit per request"):
        app.generate(pipe, [0], None, 2.0, 0.0, 2, 0, 1, timeout_s=0)
    assert not pipe.transformer._forward_pre_hooks
    assert app.generate(pipe, [0], None, 2.0, 0.0, 2, 0, 1)[1].startswith("1 images")


def test_remote_code_is_loaded_from_the_hub_only_at_a_pinned_commit(model_folders, monkeypatch):
    library_folder, hub_folder = model_folders
    app = load_app()
    calls = []

    class RecordingPipeline:  # what the app asks Diffusers for (Diffusers reads the code from the snapshot it loads)
        @staticmethod
        def load_config(source, **kwargs):
            calls.append(("load_config", source, kwargs))
            return json.loads((hub_folder / "model_index.json").read_text())

        @staticmethod
        def from_pretrained(source, **kwargs):
            calls.append(("from_pretrained", source, kwargs))
            return TreadDiTPipeline.from_pretrained(library_folder)

    monkeypatch.setattr(app, "DiffusionPipeline", RecordingPipeline)
    assert isinstance(json.loads((hub_folder / "model_index.json").read_text())["_class_name"], list)
    for revision in (None, "main", "0123abc"):
        with pytest.raises(ValueError, match=r"only loads at a pinned commit.*TREAD_MODEL_REVISION"):
            app.load_pipeline("user/tread-tiny", revision)
    assert all(name == "load_config" for name, _, _ in calls)  # refused before any code was fetched

    calls.clear()
    commit = "0123456789abcdef0123456789abcdef01234567"
    app.load_pipeline("user/tread-tiny", commit)
    assert calls == [
        ("load_config", "user/tread-tiny", {"revision": commit}),
        ("from_pretrained", "user/tread-tiny", {"trust_remote_code": True, "revision": commit}),
    ]
    calls.clear()
    app.load_pipeline(str(hub_folder))  # a local folder: its code is on disk, nothing to pin
    assert calls[-1] == ("from_pretrained", str(hub_folder), {"trust_remote_code": True})

    # The command line (a Space's TREAD_MODEL without TREAD_MODEL_REVISION): a usage error, no traceback.
    monkeypatch.delenv("TREAD_MODEL_REVISION", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", "user/tread-tiny"])
    assert exit_info.value.code == 2


def wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited ({process.returncode}):\n{log.read_text()[-5000:]}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer at {url} within {timeout} s")


@pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)
def test_demo_generates_a_grid_in_headless_chromium(model_folders, tmp_path, capsys, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    _, hub_folder = model_folders
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    started = time.monotonic()
    log = tmp_path / "app.log"
    command = [sys.executable, str(SPACE / "app.py"), "--model", str(hub_folder), "--host", "127.0.0.1"]
    with log.open("w") as output:
        server = subprocess.Popen(
            [*command, "--port", str(port)], env=env, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT
        )
    driver = None
    try:
        wait_for_server(url, server, log)
        served = time.monotonic()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        wait = WebDriverWait(driver, 60)

        driver.get(url)
        wait.until(expected_conditions.element_to_be_clickable((By.ID, "tread-generate")))
        classes = driver.find_element(By.CSS_SELECTOR, "#tread-classes input[role=combobox]")
        classes.click()
        classes.send_keys("golden")
        option = wait.until(
            lambda d: next(
                (o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text == "golden retriever"), None
            )
        )
        option.click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tread-classes .token")) == 2)
        classes.send_keys(Keys.ESCAPE)  # close the option list
        wait.until(lambda d: not [o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if o.is_displayed()])
        if KINDS:
            kind = KINDS[1] if len(KINDS) > 1 else KINDS[0]
            driver.find_element(By.XPATH, f"//*[@id='tread-guidance']//label[normalize-space()='{kind}']").click()
        driver.find_element(By.ID, "tread-generate").click()

        image = wait.until(
            lambda d: next(
                (i for i in d.find_elements(By.CSS_SELECTOR, "#tread-grid img") if i.get_attribute("src")), None
            )
        )
        summary = wait.until(lambda d: d.find_element(By.ID, "tread-time").text or None)
        generated = time.monotonic()
        screenshot = tmp_path / "tread-space-demo.png"
        driver.save_screenshot(str(screenshot))

        assert summary.startswith("8 images (2 classes x 4) in"), summary
        assert "25 steps on CPU, seed 0" in summary and (not KINDS or f", {kind})" in summary)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(image.get_attribute("src"), timeout=10) as response:
            grid = Image.open(response)
            grid.load()
        assert grid.size == (4 * 96, 2 * 96)
        assert len(set(grid.convert("L").getdata())) > 10  # samples, not a blank canvas

        # Offline: the page asked nothing of any host but the app (no fonts, analytics or CDN).
        requested = {
            json.loads(entry["message"])["message"]["params"]["request"]["url"]
            for entry in driver.get_log("performance")
            if json.loads(entry["message"])["message"]["method"] == "Network.requestWillBeSent"
        }
        outside = [
            u for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).hostname not in ("127.0.0.1", "localhost")
        ]  # fmt: skip
        assert not outside, outside

        artifact = Path(os.environ.get("TREAD_TEST_ARTIFACTS", tempfile.gettempdir())) / "tread-space-demo.png"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, artifact)
        with capsys.disabled():
            print(
                f"\n[test_space] screenshot: {artifact} (app up in {served - started:.1f} s, page + generate "
                f"{generated - served:.1f} s)"
            )
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_bad_inputs_are_gradio_errors_and_text_class_ids_are_whole_ids(model_folders):
    """Issue #21 items 9 and 11: API calls can send anything; each bad value is a `gr.Error` naming the input."""
    library_folder, _ = model_folders
    app = load_app()
    pipe = app.load_pipeline(str(library_folder))
    for scale in ("abc", float("inf"), float("nan"), 1e30, 0.5, None):
        with pytest.raises(app.gr.Error, match=r"The guidance scale must be a number from 1 to 10"):
            app.generate(pipe, [0], None, scale, 0.0, 1, 0, 1)
        with pytest.raises(app.gr.Error, match=r"The sparse guidance scale must be a number from 0 to 10"):
            app.generate(pipe, [0], None, 2.0, scale if scale != 0.5 else -1, 1, 0, 1)
    for class_ids in ("<script>alert(1)</script>", ["x"], [4], "-1", [1.5]):
        with pytest.raises(app.gr.Error, match=r"The class id must be a whole number from 0 to 3"):
            app.generate(pipe, class_ids, None, 2.0, 0.0, 1, 0, 1)
    with pytest.raises(app.gr.Error, match="at least one class"):
        app.generate(pipe, " , ", None, 2.0, 0.0, 1, 0, 1)
    # text is one id or a comma-separated list: "3" is class 3 (it used to be classes "3" one character at a time)
    assert app.class_id_list("12", 20) == [12] and app.class_id_list("1, 2", 4) == [1, 2]
    assert app.class_id_list(2, 4) == [2]
    grid, summary = app.generate(pipe, "3", None, 2.0, 0.0, 1, 0, 2)
    assert summary.startswith("2 images (1 classes x 2)") and grid.size == (2 * 96, 96)


def test_a_checkpoint_or_truncated_weights_give_a_message_and_the_page_hides_the_path(model_folders, tmp_path, capsys):
    """Issue #21 item 11: started on a checkpoint-N folder or on truncated weights, the app stops with a message (no
    OSError traceback); its header names a model folder by its name, not its absolute path."""
    library_folder, _ = model_folders
    app = load_app()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(library_folder / "transformer", checkpoint / "transformer")
    with pytest.raises(SystemExit) as error:
        app.main(["--model", str(checkpoint)])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "checkpoint-2 is a training checkpoint, not a saved pipeline" in err, err
    assert "push_to_hub.py" in err and "Traceback" not in err

    truncated = tmp_path / "truncated"
    shutil.copytree(library_folder, truncated)
    weights = truncated / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SystemExit) as error:
        app.main(["--model", str(truncated)])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "could not load truncated:" in err and "download them again" in err, err

    demo = app.build_demo(app.load_pipeline(str(library_folder)), str(library_folder))
    page = json.dumps(demo.config)
    assert f"`{library_folder.name}`" in page and str(library_folder.parent) not in page
    assert app.model_name("user/tread-digits") == "user/tread-digits"
