"""Weights from the Hugging Face Hub, against local stand-ins (no test touches the network)."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from conftest import GOLDEN, LORA_FILE, WAN_DIR, requires_golden
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.errors import CheckpointError
from liveavatar.weights import hub
from liveavatar.weights.checkpoint import LORA_REPO, WAN_REPO

pytestmark = requires_golden

TAEW = GOLDEN / "taew2_1" / "taew2_1.pth"
TAEHV_REPO = "madebyollin/taehv"


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

    def hf_hub_download(self, repo, filename, local_dir=None, local_files_only=False):
        """Only the light decoder's repo, which (like the real one) has taew2_1.pth."""
        self.calls.append((repo, local_dir, filename))
        if repo != TAEHV_REPO or filename != "taew2_1.pth":
            raise FileNotFoundError(f"{repo}/{filename}")
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        return shutil.copy(TAEW, Path(local_dir) / filename)

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


# --------------------------------------------------------------------------------------------------
# The light decoder's weights (--decoder taew2_1)


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_tiny_decoder_from_a_file_a_folder_or_the_checkpoint_folder(tmp_path, offline_empty_cache):
    assert hub.resolve_tiny_decoder(TAEW) == TAEW
    assert hub.resolve_tiny_decoder(str(TAEW.parent)) == TAEW  # a folder holding taew2_1.pth
    ckpt = tmp_path / "ckpt"
    (ckpt / "taehv" / "safetensors").mkdir(parents=True)
    (ckpt / "taehv" / "safetensors" / "taew2_1.safetensors").write_bytes(b"x")  # the repo's safetensors copy
    assert hub.resolve_tiny_decoder(None, ckpt) == ckpt / "taehv" / "safetensors" / "taew2_1.safetensors"
    (ckpt / "taehv" / "taew2_1.pth").write_bytes(b"x")
    assert hub.resolve_tiny_decoder(None, ckpt) == ckpt / "taehv" / "taew2_1.pth"  # the .pth first


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "--decoder taew2_1: no TAEW2.1 weights found (looked in {ckpt}/taehv/ and the Hugging Face cache); "
               "pass --decoder_path (a taew2_1.pth or .safetensors file, or the hub id madebyollin/taehv) or fetch it "
               "with liveavatar download --decoder taew2_1"),
        ("{tmp}/weights/taew2_1.pth", "--decoder_path {tmp}/weights/taew2_1.pth: missing; expected the TAEW2.1 weights "
                                      "file (taew2_1.pth or .safetensors) or a hub repo id like madebyollin/taehv"),
        ("{ckpt}", "--decoder_path {ckpt}: no taew2_1.pth or taew2_1.safetensors or safetensors/taew2_1.safetensors "
                   "in this folder"),
        (TAEHV_REPO, "--decoder_path madebyollin/taehv: cannot get taew2_1.pth or taew2_1.safetensors or "
                     "safetensors/taew2_1.safetensors from the Hugging Face Hub repo madebyollin/taehv (offline, or "
                     "not in that repo)"),
    ],
)
def test_tiny_decoder_not_found_errors(tmp_path, offline_empty_cache, value, message):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if value is not None:
        value = value.format(tmp=tmp_path, ckpt=ckpt)
    with pytest.raises(CheckpointError) as info:
        hub.resolve_tiny_decoder(value, ckpt)
    assert message.format(tmp=tmp_path, ckpt=ckpt) in str(info.value)


def test_tiny_decoder_hub_id_comes_from_the_cache(tmp_path, monkeypatch):
    _fill_cache(tmp_path / "hub", TAEHV_REPO, TAEW.parent, ["taew2_1.pth"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = hub.resolve_tiny_decoder(TAEHV_REPO)
    assert path.name == "taew2_1.pth" and path.read_bytes() == TAEW.read_bytes()
    assert hub.resolve_tiny_decoder(None, tmp_path / "no-ckpt") == path  # without --decoder_path: the cache too


def test_download_command_fetches_the_tiny_decoder_where_it_is_looked_for(tmp_path, monkeypatch, capsys,
                                                                          offline_empty_cache):
    from liveavatar.interfaces.cli import main
    from liveavatar.models.taehv import TinyDecoder

    fake = FakeHub()
    monkeypatch.setattr(hub, "_hub", lambda: fake)
    assert main(["download", "--ckpt_dir", str(tmp_path / "weights"), "--decoder", "taew2_1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "weights")
    assert [c[0] for c in fake.calls] == [WAN_REPO, LORA_REPO, TAEHV_REPO]
    file = tmp_path / "weights" / "taehv" / "taew2_1.pth"
    assert file.read_bytes() == TAEW.read_bytes()
    assert hub.resolve_tiny_decoder(None, tmp_path / "weights") == file
    assert TinyDecoder.from_checkpoint(file).widths == (256, 128, 64, 64)
    monkeypatch.setattr(fake, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(CheckpointError, match="cannot download the TAEW2.1 decoder from madebyollin/taehv on the "
                                              "Hugging Face Hub .taew2_1.pth: OSError"):
        hub.download_tiny_decoder(tmp_path / "elsewhere")
