"""The model-file catalog: the README table, the workflows' download lists and the missing-file messages agree with it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import ROOT

from realsr_core import CheckpointError, catalog, load_model
from realsr_core.__main__ import main
from realsr_core.catalog import CATALOG, find, missing_file_message

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# Loader node -> the ComfyUI folder (folder_paths name) its file widget reads; a workflow's models[].directory.
LOADER_DIRECTORY = {"RealSR_LoadModel": "realsr", "CheckpointLoaderSimple": "checkpoints"}
MODEL_EXT = (".pth", ".pt", ".ckpt", ".safetensors", ".sft", ".bin")
BUILTIN = "built-in/"


def test_catalog_names_links_and_folders_are_consistent() -> None:
    names = [m.name.lower() for m in CATALOG]
    assert len(names) == len(set(names))
    for m in CATALOG:
        # Direct links only: a GitHub release asset or a Hugging Face file (the frontend downloads the latter).
        assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+/releases/download/[\w.-]+/[\w.-]+", m.url) or \
            re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/main/[\w.-]+", m.url), m.url
        assert m.url.endswith("/" + (m.archive or m.name)), m
        assert m.size_mb > 0 and m.method and m.note
        assert m.comfy_folder in (catalog.COMFY_PACK, catalog.COMFY_SD)
        assert m.webui_folder in (catalog.WEBUI_PACK, catalog.WEBUI_SD)
        # SD checkpoints in the hosts' checkpoint folders, the pack's files in its own folder: in both hosts.
        assert (m.comfy_folder == catalog.COMFY_SD) == (m.webui_folder == catalog.WEBUI_SD)
    turbo = find("stablesr_turbo.ckpt")
    assert turbo.folders("comfyui") == ("models/realsr/", "models/checkpoints/")
    assert turbo.folders("webui") == ("models/RealSR/", "models/Stable-diffusion/")


def test_find_is_case_insensitive_and_takes_paths() -> None:
    assert find("femasr_srx4_MODEL_G.pth").name == "FeMaSR_SRX4_model_g.pth"
    assert find("/some/where/MMRealSRGAN.pth").name == "MMRealSRGAN.pth"
    assert find("sub\\webui_768v_139.ckpt").name == "webui_768v_139.ckpt"
    assert find("RealESRGAN_x4plus.pth") is None
    assert find("built-in/crlsr_x4.safetensors") is None  # shipped: nothing to download


@pytest.mark.parametrize("host,folder", [("comfyui", "models/realsr/"), ("webui", "models/RealSR/")])
def test_missing_official_file_names_the_folder_and_the_link(host: str, folder: str) -> None:
    msg = missing_file_message("FeMaSR_SRX4_model_g.pth", host, ["/a/models/realsr", "/b/upscale_models"])
    assert "\n" not in msg
    assert "'FeMaSR_SRX4_model_g.pth' not found" in msg and "/a/models/realsr, /b/upscale_models" in msg
    assert f"put it in {folder} of {catalog.HOST_NAMES[host]}" in msg
    assert "https://github.com/chaofengc/FeMaSR/releases/download/v0.1-pretrain_models/FeMaSR_SRX4_model_g.pth" in msg


def test_missing_sd_file_belongs_in_the_checkpoint_folders() -> None:
    url = find("v2-1_768-ema-pruned.safetensors").url
    comfy = missing_file_message("v2-1_768-ema-pruned.safetensors", "comfyui", ["/c/models/checkpoints"])
    webui = missing_file_message("v2-1_768-ema-pruned.safetensors", "webui", ["/w/models/Stable-diffusion"])
    assert "models/checkpoints/ of ComfyUI" in comfy and url in comfy
    assert "models/Stable-diffusion/ of Forge / AUTOMATIC1111" in webui and url in webui
    turbo = missing_file_message("stablesr_turbo.ckpt", "comfyui", [])
    assert "models/realsr/ of ComfyUI" in turbo and "models/checkpoints/ too" in turbo


def test_missing_file_inside_an_archive_says_to_unzip() -> None:
    msg = missing_file_message("stablesr_webui_sd-v2-1-512-ema-000117.ckpt", "webui", ["/w/models/RealSR"])
    assert "webui_512v_models.zip" in msg and "unzip" in msg and "models/RealSR/" in msg
    assert "https://huggingface.co/Iceclear/StableSR/resolve/main/webui_512v_models.zip" in msg


@pytest.mark.parametrize("host", ["comfyui", "webui", "cli"])
def test_missing_unknown_file_points_to_the_models_command(host: str) -> None:
    msg = missing_file_message("my_upscaler.pth", host, ["/x/models/realsr"])
    assert "my_upscaler.pth" in msg or "/x/models/realsr" in msg
    assert "/x/models/realsr" in msg and "python -m realsr_core models" in msg and "http" not in msg


def test_a_missing_checkpoint_path_says_where_to_download_it(tmp_path: Path, capsys) -> None:
    path = tmp_path / "weights" / "MMRealSRNet.pth"
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert f"not found: {path}" in msg and find("MMRealSRNet.pth").url in msg
    with pytest.raises(CheckpointError, match="python -m realsr_core models"):
        load_model(tmp_path / "other.pth")
    # The command line refuses before loading anything, with the same message.
    photo = tmp_path / "in.png"
    photo.write_bytes(b"")
    rc = main(["stablesr", str(photo), "-o", str(tmp_path / "out.png"), "--sd", str(tmp_path / "v2-1_512-ema-pruned.safetensors"),
               "--module", str(tmp_path / "stablesr_000117.ckpt")])
    err = capsys.readouterr().err
    assert rc == 2 and find("v2-1_512-ema-pruned.safetensors").url in err, err


def test_models_command_prints_the_catalog(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert re.match(r"file\s+method\s+size\s+ComfyUI folder\s+Forge / AUTOMATIC1111 folder\s+link$", header), header
    for m in CATALOG:
        line = next(ln for ln in out.splitlines() if ln.startswith(m.name + " "))
        assert m.url in line and m.comfy_folder in line and m.webui_folder in line and m.method in line
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [m.to_dict() for m in CATALOG]
    assert listed[0]["comfyui_folders"] == ["models/realsr/"] and listed[0]["url"] == CATALOG[0].url


def test_readme_table_is_the_catalog() -> None:
    """The README's "Model files" table is generated (python -m realsr_core models --markdown): they cannot drift."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Model files"):]
    section = section[:section.index("\n## ", 1)]
    table = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert "\n".join(table) == catalog.markdown_table(), "regenerate it: python -m realsr_core models --markdown"
    assert "python -m realsr_core models" in section
    assert [ln.split("`")[1] for ln in table[2:]] == [m.name for m in CATALOG]  # every file, once


def _loader_files(workflow: dict) -> list[tuple[dict, str, str]]:
    """(node, file name, ComfyUI directory) for every model file a loader widget of the workflow names."""
    out = []
    for node in workflow["nodes"]:
        values = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.lower().endswith(MODEL_EXT)]
        if node["type"] not in LOADER_DIRECTORY:
            assert not values, f"{node['type']} names model files {values}: add its folder to LOADER_DIRECTORY"
            continue
        out += [(node, v, LOADER_DIRECTORY[node["type"]]) for v in values]
    return out


def _frontend_entry_ok(entry: dict) -> bool:
    """ComfyUI frontend's workflow schema: {name, url (a URL), directory, hash?, hash_type?}."""
    return (set(entry) <= {"name", "url", "directory", "hash", "hash_type"}
            and all(isinstance(entry.get(k), str) and entry[k] for k in ("name", "url", "directory"))
            and entry["url"].startswith("https://"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_models_lists_match_the_catalog_and_the_widgets(path: Path) -> None:
    workflow = json.loads(path.read_text())
    expected: list[dict] = []
    for node, name, directory in _loader_files(workflow):
        listed = node["properties"].get("models")
        if name.startswith(BUILTIN):  # shipped with the pack: nothing to download
            assert not listed, f"node {node['id']}: built-in files need no models entry"
            continue
        m = find(name)
        assert m is not None and m.name == name, f"{path.name}: {name} is not an official file name"
        assert directory in [f.rstrip("/").split("/")[-1] for f in m.folders("comfyui")], (name, directory)
        entry = {"name": m.name, "url": m.url, "directory": directory}
        assert listed == [entry], f"{path.name} node {node['id']}: properties.models should be [{entry}]"
        if entry not in expected:
            expected.append(entry)
    top = workflow.get("models", [])
    assert top == expected, f"{path.name}: top-level models should list exactly the loaders' files"
    assert all(_frontend_entry_ok(e) for e in top)
    if not expected:
        assert "models" not in workflow
