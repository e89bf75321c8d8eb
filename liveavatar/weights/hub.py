"""Getting the released weights from the Hugging Face Hub (resumable downloads, progress bars)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from liveavatar.errors import CheckpointError
from liveavatar.weights.checkpoint import LORA_FILENAME, LORA_REPO, WAN_REPO

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub():
    import huggingface_hub

    return huggingface_hub


def _repo_size_gb(repo: str, allow: list[str] | None = None) -> float | None:
    """Total size of the files that would be fetched, or None if the Hub cannot be asked."""
    try:
        info = _hub().HfApi().model_info(repo, files_metadata=True)
    except Exception:  # offline or no access: the download itself reports the real error
        return None
    files = [s for s in info.siblings if allow is None or s.rfilename in allow]
    return sum(s.size or 0 for s in files) / 1e9


# What to do when the weights cannot be fetched into the Hugging Face cache (generate, app, serve without --ckpt_dir).
CACHE_HINT = ("check the network (or HF_HUB_OFFLINE) and rerun: the download resumes; or fetch the weights once with "
              "`liveavatar download --ckpt_dir ckpt` (on any machine, then copy the folder) and pass --ckpt_dir ckpt")


def _snapshot(repo: str, local_dir: Path | None = None, allow: list[str] | None = None, hint: str = CACHE_HINT) -> Path:
    size = _repo_size_gb(repo, allow)
    if size is not None:
        log.info("downloading %s: %.1f GB (resumable; rerun to continue)", repo, size)
    try:
        path = _hub().snapshot_download(repo, local_dir=local_dir, allow_patterns=allow)
    except Exception as e:
        message = " ".join(f"{type(e).__name__}: {e}".split())  # one line
        raise CheckpointError(f"cannot download {repo} from the Hugging Face Hub ({message}); {hint}") from None
    return Path(path)


def download(ckpt_dir: str | Path) -> Path:
    """Fetches both repos into ckpt_dir/Wan2.2-S2V-14B and ckpt_dir/LiveAvatar (the layout --ckpt_dir expects)."""
    ckpt_dir = Path(ckpt_dir)
    hint = (f"check the network (or HF_HUB_OFFLINE) and rerun `liveavatar download --ckpt_dir {ckpt_dir}`: it "
            f"continues where it stopped")
    _snapshot(WAN_REPO, ckpt_dir / "Wan2.2-S2V-14B", hint=hint)
    _snapshot(LORA_REPO, ckpt_dir / "LiveAvatar", allow=[LORA_FILENAME], hint=hint)
    return ckpt_dir


def cached_checkpoint() -> tuple[Path, Path]:
    """(Wan folder, LoRA file) from the Hugging Face cache, downloading them there on first use."""
    hub = _hub()
    try:
        wan = Path(hub.snapshot_download(WAN_REPO, local_files_only=True))
    except Exception:
        log.info("%s is not in the Hugging Face cache (%s): downloading it there, about 50 GB (pass --ckpt_dir to use "
                 "a folder made by `liveavatar download` instead)", WAN_REPO, hub.constants.HF_HUB_CACHE)
        wan = _snapshot(WAN_REPO)
    return wan, resolve_lora(LORA_REPO)


def resolve_lora(value: str | Path) -> Path:
    """A local LoRA file, or a hub repo id whose liveavatar.safetensors is fetched into the cache."""
    path = Path(value)
    if path.is_file():
        return path
    if path.is_dir() and (path / LORA_FILENAME).is_file():
        return path / LORA_FILENAME
    if not _REPO_ID.match(str(value)) or path.exists():
        raise CheckpointError(f"{value}: LoRA not found (expected a .safetensors file or a hub repo id like {LORA_REPO})")
    hub = _hub()
    try:
        return Path(hub.hf_hub_download(str(value), LORA_FILENAME, local_files_only=True))
    except Exception:
        pass
    size = _repo_size_gb(str(value), [LORA_FILENAME])
    if size is not None:
        log.info("downloading %s/%s: %.2f GB", value, LORA_FILENAME, size)
    try:
        return Path(hub.hf_hub_download(str(value), LORA_FILENAME))
    except Exception as e:
        message = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"cannot get {LORA_FILENAME} from {value} ({message}); pass the file with --lora_path_dmd, "
                              f"or {CACHE_HINT}") from None
