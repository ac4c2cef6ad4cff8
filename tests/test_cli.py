"""The command line on real photo files: single file, folder, no silent overwrite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, skimage_photo
from PIL import Image

from realsr_core.__main__ import main
from realsr_core.imageio import load_image, save_image


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    save_image(skimage_photo("chelsea")[:, :, 50:90, 100:148], folder / "cat.png")
    rgba = torch.cat([skimage_photo("coffee")[:, :, :32, :40], torch.full((1, 1, 32, 40), 0.5)], 1)
    save_image(rgba, folder / "cup.png")
    return folder


def test_upscale_file_then_skip_or_overwrite(tmp_path: Path, photos: Path, checkpoint: Path, capsys) -> None:
    out = tmp_path / "cat_x4.png"
    assert main(["upscale", str(photos / "cat.png"), "-o", str(out), "--model", str(checkpoint), "--tile", "32"]) == 0
    assert Image.open(out).size == (48 * 4, 40 * 4)
    err = capsys.readouterr().err
    assert "tiles" in err and "degrees" in err  # progress bar and the scores used
    before = out.read_bytes()
    # A finished result is kept: the rerun skips it and says how to redo it.
    assert main(["upscale", str(photos / "cat.png"), "-o", str(out), "--model", str(checkpoint), "--blur", "0.9"]) == 0
    assert "already done (--overwrite redoes it)" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["upscale", str(photos / "cat.png"), "-o", str(out), "--model", str(checkpoint), "--blur", "0.9",
                 "--overwrite"]) == 0
    assert out.read_bytes() != before


def test_upscale_folder_keeps_alpha(tmp_path: Path, photos: Path, checkpoint: Path) -> None:
    out = tmp_path / "out"
    assert main(["upscale", str(photos), "-o", str(out), "--model", str(checkpoint)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "cup.png"]
    cup = load_image(out / "cup.png")
    assert cup.shape == (1, 4, 128, 160)
    assert np.allclose(cup[0, 3].numpy(), 128 / 255, atol=1 / 255)


def test_bad_score_and_unknown_model_are_clear_errors(tmp_path: Path, photos: Path, checkpoint: Path, capsys) -> None:
    rc = main(["upscale", str(photos / "cat.png"), "-o", str(tmp_path / "x.png"), "--model", str(checkpoint),
               "--noise", "2"])
    assert rc == 2 and "[0, 1]" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pth"
    torch.save({"weight": torch.zeros(3)}, bogus)
    rc = main(["upscale", str(photos / "cat.png"), "-o", str(tmp_path / "y.png"), "--model", str(bogus)])
    assert rc == 2 and "bogus.pth" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()


def test_module_entry_point_runs(tmp_path: Path, photos: Path, checkpoint: Path) -> None:
    out = tmp_path / "cli.png"
    proc = subprocess.run(
        [sys.executable, "-m", "realsr_core", "upscale", str(photos / "cat.png"), "-o", str(out),
         "--model", str(checkpoint)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (192, 160)


def test_installed_command_runs_from_any_folder(tmp_path: Path, photos: Path, checkpoint: Path) -> None:
    """The README's set-up (pip install -e .) gives `python -m realsr_core` and `realsr` outside the repository."""
    script = Path(sys.executable).with_name("realsr")
    assert script.is_file(), "the package is not installed: run the README's set-up command (pip install -e .)"
    for cmd in ([sys.executable, "-m", "realsr_core"], [str(script)]):
        out = tmp_path / f"{len(cmd)}.png"
        proc = subprocess.run([*cmd, "upscale", str(photos / "cat.png"), "-o", out.name, "--model", str(checkpoint)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert Image.open(out).size == (192, 160)


def test_upscale_without_model_uses_the_shipped_one(tmp_path: Path, photos: Path, capsys) -> None:
    out = tmp_path / "cat_x4.png"
    assert main(["upscale", str(photos / "cat.png"), "-o", str(out), "--tile", "0"]) == 0
    assert load_image(out).shape[-2:] == (160, 192)
    assert "CRL-SR x4" in capsys.readouterr().err


def test_export_keeps_only_inference_weights(tmp_path: Path, photos: Path, capsys) -> None:
    from realsr_core.models.crlsr import CRLSR
    from realsr_core.training.trainer import save_weights

    torch.manual_seed(0)
    net = CRLSR(scale=4, num_feat=16, enc_blocks=1, ref_blocks=1, proj_dim=32, ef_feat=16, ef_blocks=1)
    full = tmp_path / "run.safetensors"
    save_weights(full, net.state_dict(), {"arch": "crlsr", "step": "7"})
    slim = tmp_path / "slim.safetensors"
    assert main(["export", str(full), "-o", str(slim)]) == 0
    assert slim.stat().st_size < full.stat().st_size
    from realsr_core import load_model
    from realsr_core.training.trainer import read_metadata

    a, b = load_model(full), load_model(slim)
    assert a.ignored_keys and not b.ignored_keys and read_metadata(slim)["step"] == "7"
    x = skimage_photo("chelsea")[:, :, 50:82, 100:132]
    with torch.no_grad():
        assert torch.equal(a.forward(x), b.forward(x))
    capsys.readouterr()
    assert main(["export", str(full), "-o", str(slim)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_ray_missing_is_a_clear_refusal(tmp_path: Path, photos: Path, monkeypatch, capsys) -> None:
    """Ray is optional: without it, --ray says how to install it; nothing is written."""
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    rc = main(["upscale", str(photos), "-o", f"{tmp_path / 'out'}/", "--ray", "auto"])
    assert rc == 2 and 'pip install "ray[data]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
