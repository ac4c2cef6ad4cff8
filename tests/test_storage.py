"""Jobs on URIs (issue 19, item 3): ``file://`` through pyarrow's local filesystem, and ``s3://`` against a local S3
server (moto's, on 127.0.0.1), with the local executor and with Ray workers; the same bytes, refusals, skips and
atomic writes as on local paths."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, skimage_photo, tree_bytes
from PIL import Image

from realsr_core import jobs
from realsr_core.__main__ import main
from realsr_core.files import PARTIAL_MARK
from realsr_core.imageio import save_image

pafs = pytest.importorskip("pyarrow.fs", reason="URIs need pyarrow (pip install 'ray[data]'; .ci/run installs it)")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uri") / "in"
    (root / "sub").mkdir(parents=True)
    save_image(skimage_photo("astronaut")[:, :, :72, :96], root / "astronaut.png")
    save_image(skimage_photo("coffee")[:, :, 50:114, 100:164], root / "sub" / "coffee.png")
    Image.fromarray(pytest.importorskip("skimage.data").camera()[:64, :80], "L").save(root / "gray.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 64)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def local_out(photos: Path) -> Path:
    out = photos.parent / "local"
    assert main(["upscale", str(photos), "-o", f"{out}/", "--threads", "1"]) == jobs.EXIT_SOME_FAILED
    return out


def test_file_uris_run_the_local_job(photos: Path, local_out: Path, tmp_path: Path, capsys) -> None:
    out_uri = f"file://{tmp_path}/out/"
    assert main(["upscale", f"file://{photos}", "-o", out_uri, "--threads", "1"]) == jobs.EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert f"failed: file://{photos}/broken.png: not a readable image" in err
    assert "ignored: notes.txt: not an image type (.txt)" in err
    assert tree_bytes(tmp_path / "out") == tree_bytes(local_out)
    # Rerun: finished results are skipped, untouched.
    assert main(["upscale", f"file://{photos}", "-o", out_uri]) == jobs.EXIT_SOME_FAILED
    assert "0 done, 3 skipped (already done), 1 failed" in capsys.readouterr().err
    # The same refusals as local paths, before any work.
    assert main(["upscale", f"file://{photos}", "-o", f"file://{photos}"]) == jobs.EXIT_REFUSED
    assert "is the input folder" in capsys.readouterr().err
    assert main(["upscale", f"file://{photos}/astronaut.png", "-o", f"file://{tmp_path}/a.xyz"]) == jobs.EXIT_REFUSED
    assert "unknown output type '.xyz'" in capsys.readouterr().err
    assert main(["upscale", "nosuchscheme://bucket/in", "-o", f"{tmp_path}/o/"]) == jobs.EXIT_REFUSED
    assert "cannot open nosuchscheme:// paths" in capsys.readouterr().err
    # The size limit (decompression-bomb guard) holds for files read through pyarrow too.
    assert main(["upscale", f"file://{photos}", "-o", f"file://{tmp_path}/small/", "--max-pixels", "1000"]) == \
        jobs.EXIT_SOME_FAILED
    err = capsys.readouterr().err
    summary = [ln for ln in err.splitlines() if ln.startswith("  failed:")]
    assert "0 done" in err and sum("decompression bombs" in ln for ln in summary) == 3  # + broken.png


@pytest.fixture(scope="module")
def s3(photos: Path, tmp_path_factory: pytest.TempPathFactory):
    """A local S3 server holding the photos in bucket ``archive``; yields the URI query that reaches it."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.skip("no local S3 server: pip install 'moto[server]' (.ci/run installs it)")
    port = free_port()
    log = (tmp_path_factory.mktemp("s3") / "moto.log").open("wb")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)  # for this process and the Ray workers it starts
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        fs, _ = pafs.FileSystem.from_uri(f"s3://archive?{query}&allow_bucket_creation=true")
        fs.create_dir("archive")
        pafs.copy_files(str(photos), "archive/in", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        yield fs, query
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _s3_files(fs, prefix: str) -> dict[str, bytes]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:]: fs.open_input_file(i.path).read() for i in infos if i.type == pafs.FileType.File}


def test_s3_uris_local_executor_and_resume(s3, local_out: Path, capsys) -> None:
    fs, query = s3
    src, out = f"s3://archive/in?{query}", f"s3://archive/out/?{query}"
    assert main(["upscale", src, "-o", out, "--threads", "1"]) == jobs.EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert "failed: s3://archive/in/broken.png: not a readable image" in err
    assert query not in err  # the filesystem's options are never printed (they may hold credentials)
    got = _s3_files(fs, "archive/out")
    assert got == tree_bytes(local_out) and not any(PARTIAL_MARK in k for k in got)
    fs.delete_file("archive/out/sub/coffee.png")  # as if the job had stopped before it
    assert main(["upscale", src, "-o", out, "--threads", "1"]) == jobs.EXIT_SOME_FAILED
    assert "1 done, 2 skipped (already done), 1 failed" in capsys.readouterr().err
    assert _s3_files(fs, "archive/out") == tree_bytes(local_out)


def test_s3_uris_on_ray_workers(s3, local_out: Path, capsys) -> None:
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'ray[data]' (.ci/run installs it)")
    fs, query = s3
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rc = main(["upscale", f"s3://archive/in?{query}", "-o", f"s3://archive/ray/?{query}", "--ray", "auto"])
    finally:
        ray.shutdown()
    assert rc == jobs.EXIT_SOME_FAILED, capsys.readouterr().err
    assert _s3_files(fs, "archive/ray") == tree_bytes(local_out)
