"""Nothing a user has is lost: a bad-input corpus made from real photos, run through the command line and the API.

Every case asserts the message a user sees and, where files are involved, that no file the user had changed
(sha256 of the whole tree before and after).
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, drop_root_override, skimage_photo
from PIL import Image

from realsr_core import InvalidInputError, color_fix, load_model, upscale
from realsr_core.__main__ import main
from realsr_core.errors import NumericalError, RealSRWarning
from realsr_core.imageio import load_image, save_image
from realsr_core.tiling import auto_tile_size, memory_budget
from realsr_core.weights import builtin_path


def tree(folder: Path) -> dict[str, str]:
    """Every file and link under ``folder``: relative path -> sha256 of the content (or the link target)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def crop(name: str, y: int, x: int, h: int, w: int) -> torch.Tensor:
    return skimage_photo(name)[:, :, y : y + h, x : x + w]


@pytest.fixture(scope="module")
def small(checkpoint: Path):
    return load_model(checkpoint)


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    """A folder of real photos: RGB, a subfolder, and a non-image file."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    save_image(crop("chelsea", 50, 100, 40, 48), folder / "cat.png")
    save_image(crop("coffee", 100, 200, 36, 44), folder / "sub" / "cup.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def run_cli(*args: str | Path) -> int:
    return main(["upscale", *map(str, args)])


# ---------------------------------------------------------------------------- 1, 8: interrupted and broken batches


def test_ctrl_c_leaves_no_partial_file_and_the_rerun_continues(tmp_path: Path) -> None:
    """Case 1: SIGINT during a folder job of the shipped model: one line, exit 130, only complete files; the
    rerun skips what was done and does the rest.  SIGTERM stops the same way."""
    src = tmp_path / "in"
    src.mkdir()
    for i, (name, y, x) in enumerate([("astronaut", 0, 0), ("coffee", 0, 0), ("chelsea", 0, 0), ("rocket", 0, 0),
                                      ("astronaut", 200, 200), ("coffee", 150, 250)]):
        save_image(crop(name, y, x, 160, 160), src / f"{i}_{name}.png")
    before = tree(src)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "realsr_core", "upscale", str(src), "-o", str(out), "--tile", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for sig in (signal.SIGINT, signal.SIGTERM):
        finished = len(list(out.glob("*.png")))
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 240
        while len(list(out.glob("*.png"))) == finished:  # interrupt right after a new result appears
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended before it could be interrupted"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("interrupted: ")
        assert "run the same command again" in err
        done = sorted(out.iterdir())
        assert 1 <= len(done) < 6 and all(not p.name.startswith(".") for p in done)  # no partial file
        for p in done:
            with Image.open(p) as im:
                im.load()
                assert im.size == (640, 640)
    kept = tree(out)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("is already done") == len(kept)
    assert f"{6 - len(kept)} done, {len(kept)} skipped (already done), 0 failed" in proc.stderr
    assert all(tree(out)[k] == v for k, v in kept.items())  # finished results untouched
    assert len(tree(out)) == 6 and tree(src) == before


def test_a_broken_file_is_reported_and_the_rest_goes_on(tmp_path: Path, photos: Path, checkpoint: Path,
                                                         capsys) -> None:
    """Case 8: a truncated PNG, an empty JPEG and an animated GIF fail alone; a static GIF and the others run."""
    data = (photos / "cat.png").read_bytes()
    (photos / "a_truncated.png").write_bytes(data[: len(data) // 2])
    (photos / "b_empty.jpg").write_bytes(b"")
    frames = [Image.fromarray((crop("rocket", 0, 0, 32, 32)[0].permute(1, 2, 0).numpy() * k * 255).astype(np.uint8))
              for k in (0.5, 1.0)]
    frames[0].save(photos / "c_anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[1].save(photos / "d_still.gif")
    before = tree(photos)
    out = tmp_path / "out"
    assert run_cli(photos, "-o", out, "--model", checkpoint) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "3 done, 0 skipped (already done), 3 failed, 1 ignored (not images)" in err
    assert "a_truncated.png: not a readable image" in err and "b_empty.jpg: not a readable image" in err
    assert "c_anim.gif: an animated or multi-page image (2 frames)" in err
    assert "ignored: notes.txt: not an image type (.txt)" in err
    assert sorted(tree(out)) == ["cat.png", "d_still.png", "sub/cup.png"]  # subfolder mirrored
    assert tree(photos) == before
    # The rerun redoes nothing that is finished and reports the same failures.
    assert run_cli(photos, "-o", out, "--model", checkpoint) == 3
    assert "0 done, 3 skipped (already done), 3 failed" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 2-5: outputs that would lose files


def test_output_equal_to_input_is_refused_even_with_overwrite(photos: Path, checkpoint: Path, capsys) -> None:
    """Case 2 and 3: the input file, or the input folder, as the output."""
    before = tree(photos)
    assert run_cli(photos / "cat.png", "-o", photos / "cat.png", "--model", checkpoint, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "is the input file" in err and "even with --overwrite" in err and "parameters" not in err  # before any work
    assert run_cli(photos, "-o", photos, "--model", checkpoint, "--overwrite") == 2
    assert "is the input folder" in capsys.readouterr().err
    # A symlink to the input is the input too.
    (photos.parent / "alias.png").symlink_to(photos / "cat.png")
    assert run_cli(photos / "cat.png", "-o", photos.parent / "alias.png", "--model", checkpoint, "--overwrite") == 2
    assert "is the input file" in capsys.readouterr().err
    assert tree(photos) == before


def test_output_folder_inside_input_folder_is_not_read_as_input(photos: Path, checkpoint: Path, capsys) -> None:
    out = photos / "x4"
    assert run_cli(photos, "-o", out, "--model", checkpoint) == 0
    assert run_cli(photos, "-o", out, "--model", checkpoint) == 0  # the results are not taken as inputs
    assert "0 done, 2 skipped" in capsys.readouterr().err
    assert sorted(tree(out)) == ["cat.png", "sub/cup.png"]


def test_two_inputs_for_one_output_are_refused_naming_both(tmp_path: Path, photos: Path, checkpoint: Path,
                                                           capsys) -> None:
    """Case 4: pic.png and pic.jpg; --keep-ext names the results after the whole file name."""
    save_image(crop("chelsea", 100, 150, 40, 48), photos / "cat.jpg")
    out = tmp_path / "out"
    assert run_cli(photos, "-o", out, "--model", checkpoint) == 2
    err = capsys.readouterr().err
    assert "cat.jpg and " in err and "cat.png would both be written to" in err and "--keep-ext" in err
    assert not out.exists()
    assert run_cli(photos, "-o", out, "--model", checkpoint, "--keep-ext") == 0
    assert sorted(tree(out)) == ["cat.jpg.png", "cat.png.png", "sub/cup.png.png"]


def test_symlinks_in_the_output_folder_are_not_followed(tmp_path: Path, photos: Path, checkpoint: Path,
                                                        capsys) -> None:
    """Case 5: a dangling link, a link to a file and a linked subfolder that all point outside."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "victim.png").write_bytes(b"user data")
    (out / "cat.png").symlink_to(outside / "new.png")  # dangling
    (out / "sub").symlink_to(outside)  # the subfolder's result would land outside
    before_out, before_outside = tree(out), tree(outside)
    assert run_cli(photos, "-o", out, "--model", checkpoint) == 3
    err = capsys.readouterr().err
    assert err.count("is a symbolic link") == 2 * 2 and "not followed out of the output folder" in err  # + summary
    assert tree(outside) == before_outside and tree(out) == before_out
    # A link to a file, even with --overwrite, is not replaced or written through.
    (out / "cat.png").unlink()
    (out / "cat.png").symlink_to(outside / "victim.png")
    assert run_cli(photos / "cat.png", "-o", out / "cat.png", "--model", checkpoint, "--overwrite") == 3
    assert "is a symbolic link" in capsys.readouterr().err
    assert (outside / "victim.png").read_bytes() == b"user data" and (out / "cat.png").is_symlink()


def test_an_existing_file_that_is_not_a_result_is_kept(tmp_path: Path, photos: Path, checkpoint: Path,
                                                       capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    save_image(crop("rocket", 0, 0, 30, 30), out / "cat.png")  # the user's own picture, another size
    before = tree(out)
    assert run_cli(photos, "-o", out, "--model", checkpoint) == 3
    err = capsys.readouterr().err
    assert "cat.png exists and is not a finished result of this job (a 192x160 image); pass --overwrite" in err
    assert tree(out)["cat.png"] == before["cat.png"] and (out / "sub" / "cup.png").is_file()


# ---------------------------------------------------------------------------- 9: messages, not tracebacks


def test_read_only_output_folder_is_refused_before_any_work(tmp_path: Path, photos: Path, checkpoint: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "realsr_core", "upscale", str(photos / "cat.png"), "-o", str(out / "cat.png"),
             "--model", str(checkpoint)],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            preexec_fn=drop_root_override,
        )
    finally:
        out.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: cannot write to {out}: Permission denied ({out}); choose another output"
    assert not list(out.iterdir())


def test_output_type_and_folder_targets(tmp_path: Path, photos: Path, checkpoint: Path, capsys) -> None:
    assert run_cli(photos / "cat.png", "-o", tmp_path / "out.xyz", "--model", checkpoint) == 2
    err = capsys.readouterr().err
    assert "unknown output type '.xyz'; use one of .png, .jpg" in err and "parameters" not in err
    assert run_cli(photos / "cat.png", "-o", tmp_path / "result", "--model", checkpoint) == 2
    err = capsys.readouterr().err
    assert "(no extension)" in err and "end the path with / for a folder" in err
    assert run_cli(photos / "cat.png", "-o", f"{tmp_path / 'newdir'}/", "--model", checkpoint) == 0
    assert Image.open(tmp_path / "newdir" / "cat.png").size == (192, 160)
    (tmp_path / "file").write_text("x")
    assert run_cli(photos / "cat.png", "-o", tmp_path / "file" / "x.png", "--model", checkpoint) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_devices_tiles_and_scores_are_checked(tmp_path: Path, photos: Path, checkpoint: Path, capsys) -> None:
    out = tmp_path / "x.png"
    if not torch.cuda.is_available():
        assert run_cli(photos / "cat.png", "-o", out, "--model", checkpoint, "--device", "cuda") == 2
        assert "device 'cuda' was asked for, but" in capsys.readouterr().err
    assert run_cli(photos / "cat.png", "-o", out, "--model", checkpoint, "--device", "bogus") == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err
    for flag, value in (("--blur", "5"), ("--noise", "-3"), ("--noise", "nan"), ("--tile", "-1"),
                        ("--overlap", "x"), ("--memory-budget", "lots")):
        assert run_cli(photos / "cat.png", "-o", out, "--model", checkpoint, flag, value) == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: expected" in err and "Traceback" not in err
    assert not out.exists()


def test_scores_a_model_ignores_are_reported(tmp_path: Path, photos: Path, capsys) -> None:
    """Case 10: CRL-SR takes no degradation scores: they are reported, not silently dropped."""
    assert run_cli(photos / "cat.png", "-o", tmp_path / "x.png", "--blur", "0.5", "--tile", "0") == 0
    assert "warning: --blur ignored: CRL-SR x4 takes no degradation scores" in capsys.readouterr().err


def test_decompression_bomb_is_a_clear_refusal(tmp_path: Path, photos: Path, checkpoint: Path, capsys) -> None:
    """A PNG whose header claims 200000 x 200000 pixels, and a real photo over a lowered limit."""
    raw = (photos / "cat.png").read_bytes()
    ihdr = raw[16:29]
    header = struct.pack(">II", 200_000, 200_000) + ihdr[8:]
    bomb = raw[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + raw[33:]
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(InvalidInputError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")
    assert run_cli(tmp_path / "bomb.png", "-o", tmp_path / "out.png", "--model", checkpoint) == 3
    err = capsys.readouterr().err
    assert "40000.0 megapixels is above the limit of 89.5 megapixels" in err and "--max-pixels 40000000000" in err
    assert run_cli(photos / "cat.png", "-o", tmp_path / "out.png", "--model", checkpoint, "--max-pixels", "1000") == 3
    assert "48x40 = 0.0 megapixels is above the limit" in capsys.readouterr().err
    assert run_cli(photos / "cat.png", "-o", tmp_path / "out.png", "--model", checkpoint, "--max-pixels", "0") == 0


def test_api_raises_the_package_errors(small) -> None:
    photo = crop("astronaut", 100, 180, 40, 40)
    for kwargs, message in (
        ({"tile": "64"}, "tile must be a size in pixels"),
        ({"tile": -4}, "tile must be a size in pixels"),
        ({"overlap": 1.5}, "overlap must be an integer"),
        ({"strength": 0.5}, "MM-RealSR x4 takes blur, noise, estimate_max_pixels; got unknown option"),
        ({"device": "bogus"}, "unknown device"),
        ({"dtype": torch.int8}, "dtype must be"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            upscale(small, photo, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="device 'cuda' was asked for"):
            upscale(small, photo, device="cuda")
    with pytest.raises(InvalidInputError, match=r"pixel values range from \d+(\.\d+)? to 2\d\d(\.\d+)?; expected \[0, 1\] "
                                                r"\(8-bit values: divide by 255\)"):
        upscale(small, photo * 255)
    with pytest.raises(InvalidInputError, match=r"a -1\.\.1 image"):
        upscale(small, photo * 2 - 1)
    # Slight resampling overshoot is clamped, as it always was.
    overshoot = photo.clone()
    overshoot[..., 0, 0] = 1.05
    assert upscale(small, overshoot, tile=None).image.max() <= 1
    ref = photo.clone()
    ref[0, 0, 3, 3] = float("nan")
    with pytest.raises(InvalidInputError, match="reference contains NaN"):
        color_fix(photo, ref)


def test_half_precision_call_leaves_the_loaded_model_unchanged(small) -> None:
    photo = crop("astronaut", 100, 180, 40, 40)
    weights = {k: v.clone() for k, v in small.model.state_dict().items()}
    half = upscale(small, photo, tile=None, dtype=torch.float16)  # bfloat16 on a CPU
    assert small.dtype == torch.float32
    assert all(torch.equal(v, weights[k]) for k, v in small.model.state_dict().items())
    full = upscale(small, photo, tile=None)
    assert (half.image - full.image).abs().max() < 0.1  # it did run in half precision...
    assert not torch.equal(half.image, full.image)  # ...on a rounded copy


def test_tiny_tiles_and_budgets_are_raised_with_a_warning(small) -> None:
    photo = crop("astronaut", 100, 180, 64, 64)
    with pytest.warns(RealSRWarning, match="tile 1px is too small to be useful.*using 32px tiles"):
        res = upscale(small, photo, tile=1, overlap=8, context=8)
    assert res.tile == 32
    with pytest.warns(RealSRWarning, match="memory budget of 0 MiB fits only"):
        assert upscale(small, photo, tile="auto", memory_budget=1000).tile == 32


def test_auto_tiles_on_a_cpu_follow_the_stated_budget() -> None:
    """Case 12: a 1024 x 1024 input is no longer one 3 GiB tile on a CPU, whatever RAM is free."""
    crlsr = load_model(builtin_path())
    tile = auto_tile_size(1024, 1024, crlsr.bytes_per_px, memory_budget("cpu"), crlsr.size_multiple)
    assert tile < 1024 and (tile + 32) ** 2 * crlsr.bytes_per_px <= 1024**3 * 1.5


def test_non_finite_results_are_errors_not_black_images(tmp_path: Path, photos: Path, checkpoint: Path,
                                                        small, capsys) -> None:
    """Finite weights whose output overflows to inf: refused by the API and reported by the command line."""
    sd = torch.load(checkpoint, weights_only=True)["params"]
    sd["conv_first.weight"] = torch.full_like(sd["conv_first.weight"], 3e38)  # finite, but any photo overflows
    big = tmp_path / "overflow.pth"
    torch.save({"params": sd}, big)
    with pytest.raises(NumericalError, match="produced .* NaN or infinite values"):
        upscale(load_model(big), crop("astronaut", 100, 180, 40, 40), tile=None)
    assert run_cli(photos / "cat.png", "-o", tmp_path / "o.png", "--model", big) == 3
    assert "NaN or infinite values" in capsys.readouterr().err and not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------------------- 7, 10: images as users expect


def test_exif_orientation_is_applied(tmp_path: Path, checkpoint: Path) -> None:
    """Case 7: a JPEG stored sideways with EXIF orientation 6 comes out as a viewer shows it."""
    img = Image.fromarray((crop("chelsea", 50, 100, 40, 56)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "sideways.jpg")
    assert shown.shape[-2:] == (56, 40)
    assert main(["upscale", str(tmp_path / "sideways.jpg"), "-o", str(tmp_path / "out.png"),
                 "--model", str(checkpoint)]) == 0
    assert Image.open(tmp_path / "out.png").size == (160, 224)
    # A rerun sees the finished (rotated) result as done.
    assert main(["upscale", str(tmp_path / "sideways.jpg"), "-o", str(tmp_path / "out.png"),
                 "--model", str(checkpoint)]) == 0


def test_gray_with_alpha_stays_gray_with_alpha(tmp_path: Path, checkpoint: Path) -> None:
    """Case 10: LA in, LA out; the gray channel is one channel, not an RGB with unequal channels."""
    gray = crop("camera", 100, 100, 40, 40)[0, 0].numpy()
    alpha = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    Image.fromarray((np.stack([gray, alpha], -1) * 255).astype(np.uint8), "LA").save(tmp_path / "la.png")
    assert main(["upscale", str(tmp_path / "la.png"), "-o", str(tmp_path / "out.png"), "--model", str(checkpoint)]) == 0
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "LA" and im.size == (160, 160)
    out = load_image(tmp_path / "out.png")
    assert out.shape == (1, 2, 160, 160)
    assert abs(out[0, 1].mean().item() - alpha.mean()) < 0.01
