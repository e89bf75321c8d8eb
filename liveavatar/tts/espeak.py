"""eSpeak NG through its `espeak-ng` program: the embedded default engine.

A separate program (not a linked library): it is found on PATH, given the text on stdin (UTF-8, never as
an argument, so text starting with '-' is just text), and writes a WAV file (22 050 Hz, 16-bit mono).
Voices are the languages `espeak-ng --voices` lists (en-us, de, fr-fr, ...), optionally with a variant
(`en-us+f3`, `de+Alex`, from `espeak-ng --voices=variant`). eSpeak NG is GPL-3.0-or-later; it is run as a
program and not distributed with this project.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from liveavatar.tts import Engine, Speech, TTSError

PROGRAM = os.environ.get("LIVEAVATAR_ESPEAK", "espeak-ng")
TIMEOUT_S = 120.0  # 5000 characters take about a second


def _program() -> str | None:
    return shutil.which(PROGRAM)


class EspeakEngine(Engine):
    name = "espeak"
    summary = "eSpeak NG, formant synthesis (robotic, no voice files, 100+ languages)"
    install_hint = "install eSpeak NG: apt-get install espeak-ng (Debian/Ubuntu), brew install espeak-ng (macOS)"
    default_voice = "en-us"

    def __init__(self):
        self._voices: dict[str, str] | None = None  # lower-case name -> the name to pass
        self._variants: dict[str, str] | None = None
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> bool:
        return _program() is not None

    def _run(self, args: list[str], text: str | None = None) -> subprocess.CompletedProcess:
        program = _program()
        if program is None:
            raise TTSError(f"speech engine 'espeak' is not installed: {self.install_hint}")
        try:
            return subprocess.run([program, *args], input=(text or "").encode("utf-8"), capture_output=True,
                                  timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise TTSError(f"espeak-ng took more than {TIMEOUT_S:.0f} s") from None

    @staticmethod
    def _parse(listing: str) -> dict[str, str]:
        """Names from `espeak-ng --voices` rows: the language, its aliases, the voice name and its file."""
        names: dict[str, str] = {}
        for line in listing.splitlines()[1:]:
            cols = line.split()
            if len(cols) < 5:
                continue
            language, voice_name, file = cols[1], cols[3], cols[4]
            for name in (language, voice_name, file, file.rsplit("/", 1)[-1]):
                names.setdefault(name.lower(), language)
            for alias in " ".join(cols[5:]).replace(")(", ") (").split():  # "(en 3)(en-gb 2)" -> en, en-gb
                if alias.startswith("("):
                    names.setdefault(alias[1:].lower(), alias[1:])
        return names

    def _load_voices(self) -> None:
        with self._lock:
            if self._voices is None:
                self._voices = self._parse(self._run(["--voices"]).stdout.decode("utf-8", "replace"))
                self._variants = {}
                for line in self._run(["--voices=variant"]).stdout.decode("utf-8", "replace").splitlines()[1:]:
                    cols = line.split()
                    if len(cols) >= 5 and cols[4].startswith("!v/"):  # variant files are "!v/Name"
                        self._variants[cols[4][3:].lower()] = cols[4][3:]

    def voices(self) -> list[str]:
        self._load_voices()
        return sorted(set(self._voices.values()))

    def check_voice(self, voice: str | None) -> str:
        voice = (voice or self.default_voice).strip()
        self._load_voices()
        base, _, variant = voice.partition("+")
        name = self._voices.get(base.lower())
        if name is None:
            common = [v for v in ("en-us", "en-gb", "de", "fr-fr", "es", "it", "pt", "zh", "ja", "hi") if v in self._voices]
            raise TTSError(f"unknown espeak voice {base!r}: pick a language like {', '.join(common)} "
                           f"({len(self.voices())} voices; `liveavatar voices --tts espeak` lists them)")
        if variant:
            actual = self._variants.get(variant.lower())
            if actual is None:
                raise TTSError(f"unknown espeak voice variant {variant!r}: pick one like f1, f3, m3, klatt "
                               f"(`espeak-ng --voices=variant` lists them)")
            return f"{name}+{actual}"
        return name

    def synthesize(self, text: str, voice: str) -> Speech:
        with tempfile.TemporaryDirectory(prefix="liveavatar-espeak-") as folder:
            path = Path(folder) / "speech.wav"
            done = self._run(["-v", voice, "-b", "1", "-w", str(path)], text)
            if done.returncode != 0 or not path.exists():
                message = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines()
                raise TTSError(f"espeak-ng failed (exit {done.returncode}): {message[-1] if message else 'no message'}")
            return _read_wav(path)


def _read_wav(path: Path) -> Speech:
    import wave

    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise TTSError(f"espeak-ng wrote {8 * f.getsampwidth()}-bit audio; expected 16-bit")
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2").reshape(-1, f.getnchannels())
        return Speech((pcm.mean(axis=1) / 32768).astype(np.float32), f.getframerate())
