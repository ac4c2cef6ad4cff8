"""The folder job on Ray (issue 19), on real photos with the shipped CRL-SR model: the same bytes as the local
executor, a broken file reported while the rest goes on, a worker killed mid-job, a resumed job, and a cluster of
a head and a worker node started with ``ray start`` on 127.0.0.1."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, skimage_photo, tree_bytes
from PIL import Image

from realsr_core import jobs
from realsr_core.__main__ import main
from realsr_core.files import PARTIAL_MARK
from realsr_core.imageio import save_image

pytest.importorskip("ray.data", reason="Ray is optional: pip install 'ray[data]' (.ci/run installs it)")
import ray  # noqa: E402

OK_IMAGES = 7  # the archive's readable photos; it also holds one broken file


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos of mixed sizes in nested folders, one grayscale, one JPEG, and one broken file."""
    root = tmp_path_factory.mktemp("archive") / "in"
    (root / "2019" / "summer").mkdir(parents=True)
    (root / "2020").mkdir()
    crops = {"astronaut.png": ("astronaut", 0, 0, 120, 96), "2019/coffee.png": ("coffee", 40, 200, 72, 88),
             "2019/summer/chelsea.png": ("chelsea", 30, 90, 96, 128), "2020/rocket.png": ("rocket", 100, 200, 64, 64),
             "2020/hubble.png": ("hubble_deep_field", 0, 0, 100, 80), "chelsea_b.png": ("chelsea", 100, 200, 56, 72)}
    for rel, (name, y, x, h, w) in crops.items():
        save_image(skimage_photo(name)[:, :, y:y + h, x:x + w], root / rel)
    camera = pytest.importorskip("skimage.data").camera()[100:180, 200:290]  # a grayscale photo
    Image.fromarray(camera, "L").save(root / "2019" / "camera_gray.jpg", quality=92)
    (root / "2020" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return root


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "realsr_core", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def local_out(archive: Path) -> Path:
    """The local executor's result (one thread, as each Ray worker runs with --cpus-per-worker 1)."""
    out = archive.parent / "local"
    proc = _cli("upscale", str(archive), "-o", f"{out}/", "--threads", "1")
    assert proc.returncode == jobs.EXIT_SOME_FAILED, proc.stderr
    assert "broken.png" in proc.stderr and f"{OK_IMAGES} done" in proc.stderr
    return out


def _assert_same_outputs(out: Path, local_out: Path) -> None:
    got, want = tree_bytes(out), tree_bytes(local_out)
    assert sorted(got) == sorted(want)  # every result exactly once, no partial or extra file
    assert len(want) == OK_IMAGES and not any(PARTIAL_MARK in k for k in got)
    for rel in want:
        assert got[rel] == want[rel], f"{rel} differs from the local executor's result"


def _worker_pids() -> list[int]:
    """The Ray actor processes of the job (Ray names them after the class: ray::MapWorker(MapBatches(_Worker)))."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"MapWorker(MapBatches(_Worker))" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_local_ray_same_bytes_and_a_killed_worker(archive: Path, local_out: Path, tmp_path: Path, capsys) -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # The command line on the cluster this process started (--ray auto joins it).
        rc = main(["upscale", str(archive), "-o", f"{tmp_path / 'ray'}/", "--ray", "auto", "--cpus-per-worker", "1"])
        err = capsys.readouterr().err
        assert rc == jobs.EXIT_SOME_FAILED, err  # non-zero only because of the broken file
        assert "2 workers (1 CPU each) on 1 node" in err
        assert f"{OK_IMAGES} done, 0 skipped (already done), 1 failed" in err
        assert f"failed: {archive / '2020' / 'broken.png'}: not a readable image" in err
        _assert_same_outputs(tmp_path / "ray", local_out)

        # A worker SIGKILLed while the job runs: Ray restarts it and redoes its batch; every image once.
        job = jobs.UpscaleJob(str(archive), f"{tmp_path / 'killed'}/", threads=1)
        plan = job.plan()
        killed: list[int] = []

        def kill_a_worker(outcome: jobs.Outcome) -> None:
            if not killed:
                pids = _worker_pids()
                assert pids, "no Ray worker process found"
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

        from realsr_core.ray_executor import run_on_ray

        summary = run_on_ray(job, plan, scale=4, batch_size=1, report=kill_a_worker)
        assert killed and killed[0] not in _worker_pids()
        assert [o.task for o in summary.outcomes] == plan.tasks
        assert summary.count("done") == OK_IMAGES and summary.count("failed") == 1
        _assert_same_outputs(tmp_path / "killed", local_out)
    finally:
        ray.shutdown()


def test_interrupted_job_resumes_with_the_rest(archive: Path, local_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "realsr_core", "upscale", str(archive), "-o", f"{out}/", "--ray", "auto",
            "--workers", "1", "--batch-size", "1"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("[3/"):
            proc.send_signal(signal.SIGINT)  # Ctrl-C after three images
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == jobs.EXIT_INTERRUPTED, "".join(lines) + rest
    assert "run the same command again to do the rest" in rest
    kept = tree_bytes(out)
    assert 3 <= len(kept) < OK_IMAGES and not any(PARTIAL_MARK in k for k in kept)

    again = _cli("upscale", str(archive), "-o", f"{out}/", "--ray", "auto", "--workers", "1")
    assert again.returncode == jobs.EXIT_SOME_FAILED, again.stderr
    # Only the rest was done; what the first run finished was skipped, untouched.
    assert f"{OK_IMAGES - len(kept)} done, {len(kept)} skipped (already done), 1 failed" in again.stderr
    assert all(tree_bytes(out)[k] == v for k, v in kept.items())
    _assert_same_outputs(out, local_out)


def test_head_and_worker_node_started_with_ray_start(archive: Path, local_out: Path, tmp_path: Path) -> None:
    ray_cmd = str(Path(sys.executable).with_name("ray"))
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    # Ray's default for `ray start` is token authentication: the nodes and the driver share one token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        for extra in (["--head", "--port", str(port), "--include-dashboard", "false"],
                      ["--address", f"127.0.0.1:{port}"]):
            started = subprocess.run([ray_cmd, "start", *extra, *common], capture_output=True, text=True, env=env,
                                     timeout=120)
            assert started.returncode == 0, started.stdout + started.stderr
        proc = _cli("upscale", str(archive), "-o", f"{tmp_path / 'cluster'}/", "--ray", f"127.0.0.1:{port}",
                    env=env)
        assert proc.returncode == jobs.EXIT_SOME_FAILED, proc.stderr
        assert "2 workers (1 CPU each) on 2 nodes" in proc.stderr, proc.stderr
        _assert_same_outputs(tmp_path / "cluster", local_out)
    finally:
        subprocess.run([ray_cmd, "stop", "--force"], capture_output=True, env=env, timeout=120)
