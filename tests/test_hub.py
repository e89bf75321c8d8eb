"""Weights from the Hugging Face Hub, against local stand-ins (no test touches the network)."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from conftest import LORA_FILE, WAN_DIR, requires_golden
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.errors import CheckpointError
from liveavatar.weights import hub
from liveavatar.weights.checkpoint import LORA_REPO, WAN_REPO

pytestmark = requires_golden


def _fill_cache(cache: Path, repo: str, source: Path, files: list[str] | None = None) -> None:
    """Lays out `source` as a snapshot of `repo` in a Hugging Face cache folder."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    if files is None:
        shutil.copytree(source, snap)
    else:
        snap.mkdir(parents=True)
        for name in files:
            shutil.copy(source / name, snap / name)


def test_cached_checkpoint_loads_from_hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _fill_cache(cache, WAN_REPO, WAN_DIR)
    _fill_cache(cache, LORA_REPO, LORA_FILE.parent, ["liveavatar.safetensors"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    wan, lora = hub.cached_checkpoint()
    assert wan.name == "0" * 40 and lora.name == "liveavatar.safetensors"
    pipe = LiveAvatarPipeline.from_pretrained(wan, lora_file=lora, device="cpu", dtype=torch.float32)
    assert pipe.dit.config.num_layers == 8


def test_missing_cache_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=f"cannot download {WAN_REPO} from the Hugging Face Hub") as failed:
        hub.cached_checkpoint()
    message = str(failed.value)
    assert "\n" not in message  # one line
    # What to do: the download resumes when rerun, or the weights come from a folder made by `liveavatar download`.
    assert message.endswith("; check the network (or HF_HUB_OFFLINE) and rerun: the download resumes; or fetch the "
                            "weights once with `liveavatar download --ckpt_dir ckpt` (on any machine, then copy the "
                            "folder) and pass --ckpt_dir ckpt")


def test_download_command_error_says_how_to_continue(tmp_path, monkeypatch, capsys):
    from liveavatar.interfaces.cli import main

    class Offline(FakeHub):
        def snapshot_download(self, *args, **kwargs):
            raise OSError("Cannot reach https://huggingface.co:\n  connection refused")

    monkeypatch.setattr(hub, "_hub", lambda: Offline())
    assert main(["download", "--ckpt_dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: cannot download {WAN_REPO} from the Hugging Face Hub (OSError: Cannot reach "
                       f"https://huggingface.co: connection refused); check the network (or HF_HUB_OFFLINE) and rerun "
                       f"`liveavatar download --ckpt_dir {tmp_path / 'w'}`: it continues where it stopped")


class FakeHub:
    """Stands in for huggingface_hub: 'downloads' by copying the golden checkpoint."""

    def __init__(self):
        self.calls = []

    def snapshot_download(self, repo, local_dir=None, allow_patterns=None, local_files_only=False):
        self.calls.append((repo, local_dir, allow_patterns))
        source = WAN_DIR if repo == WAN_REPO else LORA_FILE.parent
        for path in source.rglob("*"):
            rel = path.relative_to(source)
            if path.is_file() and (allow_patterns is None or str(rel) in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, Path(local_dir) / rel)
        return str(local_dir)

    def HfApi(self):
        def model_info(repo, files_metadata=False):
            return SimpleNamespace(siblings=[SimpleNamespace(rfilename="liveavatar.safetensors", size=2 * 10**9),
                                             SimpleNamespace(rfilename="config.json", size=10**9)])
        return SimpleNamespace(model_info=model_info)


def test_download_lays_out_both_repos(tmp_path, monkeypatch, caplog):
    fake = FakeHub()
    monkeypatch.setattr(hub, "_hub", lambda: fake)
    caplog.set_level("INFO")
    root = hub.download(tmp_path / "ckpt")
    assert [c[0] for c in fake.calls] == [WAN_REPO, LORA_REPO]
    assert fake.calls[1][2] == ["liveavatar.safetensors"]
    assert "downloading Wan-AI/Wan2.2-S2V-14B: 3.0 GB" in caplog.text
    assert "downloading Quark-Vision/Live-Avatar: 2.0 GB" in caplog.text
    pipe = LiveAvatarPipeline.from_pretrained(root, device="cpu", dtype=torch.float32)
    assert pipe.vae is not None


def test_resolve_lora_paths_and_errors(tmp_path):
    assert hub.resolve_lora(LORA_FILE) == LORA_FILE
    assert hub.resolve_lora(LORA_FILE.parent) == LORA_FILE
    with pytest.raises(CheckpointError, match="LoRA not found"):
        hub.resolve_lora(tmp_path / "missing.safetensors")


def test_download_command(tmp_path, monkeypatch, capsys):
    from liveavatar.interfaces.cli import main

    monkeypatch.setattr(hub, "_hub", lambda: FakeHub())
    assert main(["download", "--ckpt-dir", str(tmp_path / "weights")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "weights")
    assert (tmp_path / "weights" / "LiveAvatar" / "liveavatar.safetensors").is_file()
    assert (tmp_path / "weights" / "Wan2.2-S2V-14B" / "config.json").is_file()
