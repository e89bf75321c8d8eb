"""Piper: neural voices (VITS exported to ONNX) run by ONNX Runtime, an optional extra.

    pip install 'liveavatar[tts]'                                   # piper-tts (GPL-3.0) + onnxruntime
    liveavatar download --tts piper --voice en_US-lessac-medium     # the voice: .onnx + .onnx.json

A voice is a model file `NAME.onnx` with its configuration `NAME.onnx.json` beside it. `--voice` takes a
voice name, looked up in the voices folder (`liveavatar download --tts piper` puts them there:
$LIVEAVATAR_VOICES, default ~/.cache/liveavatar/voices), or the path of a voice's .onnx file. The voices
come from the Hugging Face repo rhasspy/piper-voices; each has its own licence (its MODEL_CARD).
Synthesis runs on the CPU (ONNX Runtime's CPU provider).
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from pathlib import Path

import numpy as np

from liveavatar.tts import Engine, Speech, TTSError

VOICES_REPO = "rhasspy/piper-voices"
# en_US-lessac-medium: <language>_<REGION>-<name>-<quality>
_VOICE_NAME = re.compile(r"^(?P<family>[a-z]{2,3})_(?P<region>[A-Za-z0-9]+)-(?P<name>[^-/\\]+)-(?P<quality>[a-z_]+)$")
_LOADED_MAX = 4  # voices kept loaded (an ONNX session each)


def voices_dir() -> Path:
    """Where downloaded Piper voices live: $LIVEAVATAR_VOICES, else ~/.cache/liveavatar/voices."""
    folder = os.environ.get("LIVEAVATAR_VOICES")
    if folder:
        return Path(folder).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "liveavatar" / "voices"


def repo_paths(voice: str) -> tuple[str, str]:
    """The voice's model and config paths in rhasspy/piper-voices; raises TTSError for a malformed name."""
    match = _VOICE_NAME.match(voice)
    if match is None:
        raise TTSError(f"{voice!r} is not a Piper voice name (like en_US-lessac-medium: language_REGION-name-quality)")
    folder = f"{match['family']}/{match['family']}_{match['region']}/{match['name']}/{match['quality']}"
    return f"{folder}/{voice}.onnx", f"{folder}/{voice}.onnx.json"


class PiperEngine(Engine):
    name = "piper"
    summary = "Piper, neural voices (ONNX Runtime; a voice file of tens of MB each)"
    install_hint = "pip install 'liveavatar[tts]' (piper-tts and onnxruntime)"
    default_voice = "en_US-lessac-medium"

    def __init__(self):
        self._loaded: dict[Path, object] = {}
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("piper", "onnxruntime"))

    def voices(self) -> list[str]:
        folder = voices_dir()
        if not folder.is_dir():
            return []
        return sorted(p.name[: -len(".onnx")] for p in folder.rglob("*.onnx") if Path(f"{p}.json").is_file())

    def check_voice(self, voice: str | None) -> str:
        voice = (voice or self.default_voice).strip()
        if voice.endswith(".onnx") or os.sep in voice or "/" in voice:
            path = Path(voice).expanduser()
            if not path.is_file():
                raise TTSError(f"{voice}: Piper voice file not found")
            if not Path(f"{path}.json").is_file():
                raise TTSError(f"{voice}: its configuration {path.name}.json is missing beside it")
            return str(path.resolve())
        found = [p for p in (voices_dir().rglob(f"{voice}.onnx") if voices_dir().is_dir() else [])
                 if Path(f"{p}.json").is_file()]
        if found:
            return str(found[0])
        repo_paths(voice)  # a malformed name says so
        have = self.voices()
        choice = f" (downloaded: {', '.join(have)})" if have else ""
        raise TTSError(f"Piper voice {voice!r} is not downloaded{choice}: run `liveavatar download --tts piper --voice "
                       f"{voice}`, or pass --voice path/to/voice.onnx")

    def _voice(self, path: Path):
        with self._lock:
            if path not in self._loaded:
                from piper import PiperVoice

                try:
                    loaded = PiperVoice.load(path, config_path=f"{path}.json", use_cuda=False)
                except Exception as e:  # a corrupt model or config: one line naming the file
                    raise TTSError(f"{path}: not a usable Piper voice ({type(e).__name__}: {e})") from None
                while len(self._loaded) >= _LOADED_MAX:
                    self._loaded.pop(next(iter(self._loaded)))
                self._loaded[path] = loaded
            return self._loaded[path]

    def synthesize(self, text: str, voice: str) -> Speech:
        model = self._voice(Path(voice))
        chunks = [chunk.audio_float_array for chunk in model.synthesize(text)]
        rate = model.config.sample_rate
        if not chunks:
            return Speech(np.zeros(0, np.float32), rate)
        return Speech(np.concatenate(chunks).astype(np.float32), rate)


def download_voice(voice: str, folder: Path | None = None) -> Path:
    """Fetches a voice's .onnx and .onnx.json from rhasspy/piper-voices into the voices folder (resumable)
    and returns the .onnx file's path."""
    from liveavatar.weights import hub

    model, config = repo_paths(voice)
    folder = Path(folder) if folder is not None else voices_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for name in (config, model):
        try:
            hub._hub().hf_hub_download(VOICES_REPO, name, local_dir=folder)
        except Exception as e:
            raise TTSError(f"cannot download {name} from {VOICES_REPO} ({type(e).__name__}: {e}); check the voice's "
                           f"name (the repo's voices.json lists them)") from None
    return folder / model
