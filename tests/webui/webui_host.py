"""Real webui servers (Forge, AUTOMATIC1111) with this repository as an extension: the `webui` fixture.

Point the tests to webuis built with ``../shared/webui/`` (setup_forge.sh / setup_a1111.sh):
``WEBUI_FORGE_PATH`` + ``WEBUI_FORGE_PYTHON`` and / or ``WEBUI_A1111_PATH`` + ``WEBUI_A1111_PYTHON``.  Each host
is started headless on the CPU, API only on 127.0.0.1 (the flags of the shared start scripts), with the
repository linked into its ``extensions/`` (the link is removed afterwards), the model stand-ins in a temporary
``--realsr-models-path`` and a real-size random SD 2.1 file (float32, as released) in a temporary
``--ckpt-dir``.  Without the variables every test here is skipped, saying which to set.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NCNN_DIR, ROOT, fixture_state_dict, make_weights
from PIL import Image

HOSTS = {
    "forge": ("WEBUI_FORGE_PATH", "WEBUI_FORGE_PYTHON", ["--always-cpu"]),
    "a1111": ("WEBUI_A1111_PATH", "WEBUI_A1111_PYTHON", ["--use-cpu", "all", "--precision", "full", "--no-half"]),
}
COMMON_FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-python-version-check", "--skip-torch-cuda-test",
                "--skip-version-check", "--api", "--nowebui", "--no-download-sd-model", "--server-name", "127.0.0.1"]
# Official file name -> (fixture, container), written from the fixture manifests' deterministic weights.
MODEL_FILES = {"FeMaSR_SRX4_model_g.pth": ("femasr_x4", None), "MMRealSRGAN.pth": ("mmrealsr_x4", None),
               "stablesr_000117.ckpt": ("stablesr_struct", "state_dict"),
               "vqgan_cfw_00011.ckpt": ("stablesr_cfw", "state_dict")}
SD21_FP16 = Path.home() / ".cache" / "realsr-tests" / "sd21-v1"  # tests/host/sd21_random.py writes these
SD21 = Path.home() / ".cache" / "realsr-tests" / "sd21-v1-fp32"  # the same weights in float32, as released
SD_FILE, V768_FILE = "v2-1_512-ema-pruned.safetensors", "v2-1_768-ema-pruned.safetensors"


def sd21_file(name: str = SD_FILE) -> Path:
    """A float32 SD 2.1 stand-in (as released; AUTOMATIC1111 runs its weights in float32 on the CPU)."""
    out = SD21 / name
    if not out.exists():
        src = SD21_FP16 / name
        if not src.exists():
            pytest.skip(f"no {src}: make it with tests/host/sd21_random.py (needs COMFYUI_PATH)")
        from safetensors.torch import load_file, save_file

        SD21.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float() for k, v in load_file(str(src)).items()}, str(out.with_suffix(".part")))
        os.replace(out.with_suffix(".part"), out)
    return out


NCNN_MODEL = "realesr-animevideov3-x4"  # Real-ESRGAN's compact net as an ncnn file (tests/test_ncnn.py)


def write_models(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for ext in (".param", ".bin"):
        if (NCNN_DIR / f"{NCNN_MODEL}{ext}").exists():
            shutil.copy(NCNN_DIR / f"{NCNN_MODEL}{ext}", folder)
    for name, (fixture, wrapper) in MODEL_FILES.items():
        if wrapper is None:
            wrapper = make_weights.load_manifest(str(ROOT / "tests" / "fixtures" / fixture / "manifest.json"))["wrapper"]
        make_weights.save_checkpoint(fixture_state_dict(fixture), str(folder / name), wrapper)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    """A running webui: ``call(method, path, body) -> (status, json or text)``."""

    def __init__(self, name: str, root: Path, port: int, proc: subprocess.Popen, log: Path, models: Path) -> None:
        self.name, self.root, self.port, self.proc, self.log, self.models = name, root, port, proc, log, models

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 1800) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def ok(self, method: str, path: str, body: dict | None = None) -> dict:
        status, out = self.call(method, path, body)
        assert status == 200, f"{self.name} {path} -> {status}: {str(out)[:2000]}\nlog tail:\n{self.log_tail()}"
        return out

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture(scope="module", params=list(HOSTS))
def webui(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUI]:
    name = request.param
    path_var, python_var, flags = HOSTS[name]
    root, python = os.environ.get(path_var), os.environ.get(python_var)
    if not (root and python):
        pytest.skip(f"webui host tests: set {path_var} and {python_var} to a webui built with ../shared/webui/ "
                    f"(setup_{name}.sh) and its venv's python")
    tmp = tmp_path_factory.mktemp(f"webui-{name}")
    models, ckpts = tmp / "RealSR", tmp / "Stable-diffusion"
    write_models(models)
    ckpts.mkdir()
    for sd_file, yaml in ((SD_FILE, "v2-inference.yaml"), (V768_FILE, "v2-inference-v.yaml")):
        (ckpts / sd_file).symlink_to(sd21_file(sd_file))
        if name == "a1111":
            # AUTOMATIC1111 v1.10 cannot guess an SD 2.x config on the CPU: its v-prediction probe runs the UNet in
            # devices.dtype_unet, still float16 when it runs, on float32 input, and fails.  Its own config beside
            # the file skips the probe (what A1111's docs tell SD 2.x users to do).  Forge gets none.
            config = Path(root) / "repositories" / "stable-diffusion-stability-ai" / "configs" / "stable-diffusion"
            (ckpts / sd_file).with_suffix(".yaml").write_text((config / yaml).read_text())
    link = Path(root) / "extensions" / "realsr-test"
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(ROOT)
    port, log = free_port(), tmp / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COMMANDLINE_ARGS": "", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "wb") as f:
        proc = subprocess.Popen([python, "launch.py", *flags, *COMMON_FLAGS, "--port", str(port),
                                 "--realsr-models-path", str(models), "--ckpt-dir", str(ckpts)],
                                cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
    server = WebUI(name, Path(root), port, proc, log, models)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited while starting:\n{server.log_tail()}")
            try:
                if server.call("GET", "/sdapi/v1/upscalers", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"{name} did not answer within 300 s:\n{server.log_tail()}")
        # Load the checkpoint now, with one plain img2img, rather than inside the first test.
        server.ok("POST", "/sdapi/v1/img2img", {"init_images": [b64png(photo(0, 0, 32, 32))], "prompt": "warm-up",
                                                 "steps": 1, "width": 64, "height": 64, "seed": 1})
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        link.unlink(missing_ok=True)


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(data: str) -> np.ndarray:
    """A base64 image of an API answer -> (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1]))).convert("RGB"))


def photo(x: int, y: int, w: int, h: int) -> Image.Image:
    """A crop of scikit-image's astronaut (a real photo)."""
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.astronaut()[y:y + h, x:x + w])


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    a = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()
