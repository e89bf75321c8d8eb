"""Getting the released weights from the Hugging Face Hub (resumable downloads, progress bars): the two repos of
the model, and the light TAEW2.1 decoder's file (madebyollin/taehv, `--decoder taew2_1`)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from liveavatar.errors import CheckpointError
from liveavatar.models import taehv
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


def download(ckpt_dir: str | Path, decoders: tuple[str, ...] = ()) -> Path:
    """Fetches both repos into ckpt_dir/Wan2.2-S2V-14B and ckpt_dir/LiveAvatar (the layout --ckpt_dir expects);
    with decoders=("taew2_1",) also the light decoder's file into ckpt_dir/taehv/ (where --decoder taew2_1
    looks for it)."""
    ckpt_dir = Path(ckpt_dir)
    hint = (f"check the network (or HF_HUB_OFFLINE) and rerun `liveavatar download --ckpt_dir {ckpt_dir}`: it "
            f"continues where it stopped")
    _snapshot(WAN_REPO, ckpt_dir / "Wan2.2-S2V-14B", hint=hint)
    _snapshot(LORA_REPO, ckpt_dir / "LiveAvatar", allow=[LORA_FILENAME], hint=hint)
    for name in decoders:
        if name != "wan":
            download_tiny_decoder(ckpt_dir / TINY_DECODER_DIR)
    return ckpt_dir


# --------------------------------------------------------------------------------------------- light decoder
TINY_DECODER_DIR = "taehv"  # <ckpt_dir>/taehv/taew2_1.pth, where `liveavatar download --decoder taew2_1` puts it
_TINY_HINT = ("pass --decoder_path (a taew2_1.pth or .safetensors file, or the hub id madebyollin/taehv) or fetch "
              "it with liveavatar download --decoder taew2_1")


def _tiny_file_in(folder: Path) -> Path | None:
    return next((folder / name for name in taehv.FILES if (folder / name).is_file()), None)


def download_tiny_decoder(folder: str | Path, repo: str = taehv.REPO) -> Path:
    """Fetches the TAEW2.1 weights (the first of taehv.FILES the repo has) into `folder`; returns the file."""
    hub = _hub()
    errors = []
    for name in taehv.FILES:
        try:
            path = Path(hub.hf_hub_download(repo, name, local_dir=folder))
        except Exception as e:  # absent under that name, or offline: the next name, then one error for all
            errors.append(f"{name}: {type(e).__name__}")
            continue
        log.info("TAEW2.1 decoder weights: %s", path)
        return path
    raise CheckpointError(f"cannot download the TAEW2.1 decoder from {repo} on the Hugging Face Hub "
                          f"({'; '.join(errors)})")


def _hub_tiny_decoder(repo: str, local_only: bool) -> Path | None:
    hub = _hub()
    for name in taehv.FILES:
        try:
            return Path(hub.hf_hub_download(repo, name, local_files_only=local_only))
        except Exception:
            continue
    return None


def resolve_tiny_decoder(value: str | Path | None, ckpt_dir: str | Path | None = None) -> Path:
    """The TAEW2.1 weights file for --decoder taew2_1: `value` (--decoder_path) is a file, a folder holding one
    (taew2_1.pth, taew2_1.safetensors or safetensors/taew2_1.safetensors) or a hub repo id (madebyollin/taehv:
    from the Hugging Face cache, else downloaded there). Without it: <ckpt_dir>/taehv/, then the cache.
    Raises CheckpointError naming --decoder_path and liveavatar download when there is none."""
    if value is None:
        found = _tiny_file_in(Path(ckpt_dir) / TINY_DECODER_DIR) if ckpt_dir is not None else None
        found = found or _hub_tiny_decoder(taehv.REPO, local_only=True)
        if found is None:
            where = f"{Path(ckpt_dir) / TINY_DECODER_DIR}/ and " if ckpt_dir is not None else ""
            raise CheckpointError(f"--decoder {taehv.NAME}: no TAEW2.1 weights found (looked in {where}the Hugging "
                                  f"Face cache); {_TINY_HINT}")
        return found
    path = Path(value)
    if path.is_file():
        return path
    if path.is_dir():
        found = _tiny_file_in(path)
        if found is None:
            raise CheckpointError(f"--decoder_path {value}: no {' or '.join(taehv.FILES)} in this folder")
        return found
    if not _REPO_ID.match(str(value)) or path.suffix in (".pth", ".safetensors", ".pt"):
        raise CheckpointError(f"--decoder_path {value}: missing; expected the TAEW2.1 weights file "
                              f"(taew2_1.pth or .safetensors) or a hub repo id like {taehv.REPO}")
    found = _hub_tiny_decoder(str(value), local_only=True) or _hub_tiny_decoder(str(value), local_only=False)
    if found is None:
        raise CheckpointError(f"--decoder_path {value}: cannot get {' or '.join(taehv.FILES)} from the Hugging Face "
                              f"Hub repo {value} (offline, or not in that repo); {_TINY_HINT}")
    return found


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
