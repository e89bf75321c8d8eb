"""Text in: speech synthesis (TTS) behind one small interface, with engines chosen by name.

An engine turns text into a mono waveform at its own rate; `synthesize_file` writes it as a 16-bit WAV,
which then takes the path of an uploaded speech file (decoding and resampling to 16 kHz, optional trim
and loudness). Engines are found at run time, so the project depends on none of them:

    espeak   eSpeak NG, the embedded default: the `espeak-ng` program (Debian/Ubuntu: apt-get install
             espeak-ng; macOS: brew install espeak-ng). Robotic, but small, fast and needs no voice files.
    piper    Piper (pip install 'liveavatar[tts]'): neural voices, an ONNX model + JSON each, fetched with
             `liveavatar download --tts piper --voice NAME` or given as a file (--voice path/voice.onnx).

Other packages can add engines through the entry-point group ``liveavatar.tts_engines`` (name -> a class
with the `Engine` interface), or at run time with `register_engine`.
"""

from __future__ import annotations

import re
import threading
import unicodedata
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liveavatar.errors import InputError

DEFAULT_ENGINE = "espeak"
MAX_TEXT_CHARS = 5000  # the longest text a job may speak (about 5 minutes of eSpeak NG speech)
ENTRY_POINT_GROUP = "liveavatar.tts_engines"


class TTSError(InputError):
    """Text that cannot be spoken: empty or too long text, an unknown or missing engine or voice."""


@dataclass
class Speech:
    """Synthesised speech: mono float32 samples in [-1, 1] at `sample_rate`."""

    samples: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


class Engine:
    """A speech synthesiser. Subclasses set the class attributes and implement the methods below."""

    name = ""
    summary = ""  # one line for listings
    install_hint = ""  # what to install when `available()` is False
    default_voice = ""

    @classmethod
    def available(cls) -> bool:
        """Whether the engine can run here (its program or package is installed); cheap, loads nothing."""
        raise NotImplementedError

    def voices(self) -> list[str]:
        """The voice names this engine has here."""
        raise NotImplementedError

    def check_voice(self, voice: str | None) -> str:
        """The voice to use for `voice` (None: the default); raises TTSError naming the choices."""
        raise NotImplementedError

    def synthesize(self, text: str, voice: str) -> Speech:
        """Speaks `text` (already checked) with a voice returned by `check_voice`."""
        raise NotImplementedError


_ENGINES: dict[str, str | type[Engine]] = {
    "espeak": "liveavatar.tts.espeak:EspeakEngine",
    "piper": "liveavatar.tts.piper:PiperEngine",
}
_instances: dict[str, Engine] = {}
_lock = threading.Lock()
_discovered = False


def register_engine(name: str, engine: str | type[Engine]) -> None:
    """Adds (or replaces) an engine: a class, or "module:Class" imported when it is first used."""
    with _lock:
        _ENGINES[name] = engine
        _instances.pop(name, None)


def _discover() -> None:
    """Adds the engines other installed packages declare (entry points), once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        _ENGINES.setdefault(point.name, point.value)


def _engine_class(name: str) -> type[Engine]:
    target = _ENGINES[name]
    if isinstance(target, str):
        import importlib

        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def engine_names() -> list[str]:
    """Every engine this installation knows, installed or not."""
    with _lock:
        _discover()
        return sorted(_ENGINES)


def available_engines() -> list[str]:
    """The engines that can run here."""
    return [name for name in engine_names() if _engine_class(name).available()]


def get_engine(name: str | None = None) -> Engine:
    """The engine called `name` (None: the default), ready to use; raises TTSError when it is unknown or not
    installed, naming what to pick or install."""
    name = (name or DEFAULT_ENGINE).strip().lower()
    names = engine_names()
    if name not in names:
        raise TTSError(f"unknown speech engine {name!r}: pick one of {', '.join(names)}")
    with _lock:
        if name not in _instances:
            cls = _engine_class(name)
            if not cls.available():
                raise TTSError(f"speech engine {name!r} is not installed: {cls.install_hint}")
            _instances[name] = cls()
        return _instances[name]


def check_text(text: str | None, limit: int | None = MAX_TEXT_CHARS) -> str:
    """The text to speak, stripped; raises TTSError for empty text, text over `limit` characters, or text
    that is not UTF-8 (undecodable command-line bytes)."""
    text = (text or "").strip()
    if not text:
        raise TTSError("the text to speak is empty")
    if limit is not None and len(text) > limit:
        raise TTSError(f"the text is {len(text)} characters long; the limit is {limit} (split it into several jobs)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TTSError(f"the text is not UTF-8 (character {e.start}); pass it UTF-8 encoded") from None
    if not any(unicodedata.category(c)[0] in "LN" for c in text):
        raise TTSError("the text has no letters or digits to speak")
    return text


# A sentence ends at . ! ? or an ellipsis followed by space or the end, or at a CJK full stop, ! or ?;
# closing quotes and brackets stay with their sentence. A blank line (a new paragraph) ends one too.
_SENTENCE = re.compile(r"\S.*?(?:[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)|[\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*|$)", re.S)
_PARAGRAPH = re.compile(r"\n\s*\n")


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """Splits text into sentences to synthesise one at a time (a live session starts speaking the first
    while the rest is synthesised). A sentence longer than `max_chars` is cut at commas or spaces."""
    sentences = []
    pieces = (m.group() for paragraph in _PARAGRAPH.split(text) for m in _SENTENCE.finditer(paragraph))
    for piece in pieces:
        piece = " ".join(piece.split())
        while len(piece) > max_chars:
            cut = max(piece.rfind(", ", 0, max_chars), piece.rfind("; ", 0, max_chars))
            cut = cut + 1 if cut > 0 else piece.rfind(" ", 0, max_chars)
            if cut <= 0:
                cut = max_chars
            sentences.append(piece[:cut].strip())
            piece = piece[cut:].strip()
        if piece and any(unicodedata.category(c)[0] in "LN" for c in piece):
            sentences.append(piece)
    return sentences


def write_wav(path: str | Path, speech: Speech) -> Path:
    """Writes mono 16-bit PCM WAV at the speech's own rate."""
    path = Path(path)
    pcm = (np.clip(speech.samples, -1.0, 1.0) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(speech.sample_rate)
        out.writeframes(pcm.tobytes())
    return path


def synthesize(text: str, engine: str | None = None, voice: str | None = None, limit: int | None = MAX_TEXT_CHARS) -> Speech:
    """Checks the text, the engine and the voice, then speaks the text."""
    text = check_text(text, limit)
    tts = get_engine(engine)
    speech = tts.synthesize(text, tts.check_voice(voice))
    if len(speech.samples) == 0:
        raise TTSError(f"the {tts.name} engine made no sound for this text")
    return speech


def synthesize_file(text: str, path: str | Path, engine: str | None = None, voice: str | None = None,
                    limit: int | None = MAX_TEXT_CHARS) -> Path:
    """Speaks `text` into a WAV file at `path` (written whole, then moved into place)."""
    path = Path(path)
    speech = synthesize(text, engine, voice, limit)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_wav(tmp, speech)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def describe_engines() -> list[str]:
    """One line per known engine: its name, whether it is installed, and what it is."""
    lines = []
    for name in engine_names():
        cls = _engine_class(name)
        state = "installed" if cls.available() else f"not installed ({cls.install_hint})"
        lines.append(f"{name}: {cls.summary}; {state}")
    return lines
