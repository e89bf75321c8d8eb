"""Text into a live session: each message is split into sentences, and each sentence is synthesised and pushed
into the session's speech queue as soon as it is ready, on a thread of its own, so the avatar starts speaking
the first sentence while the rest is still being synthesised.

The speech takes the path of pushed microphone speech from there (liveavatar.engine.live): it is spoken in
the order pushed, after whatever was pushed before it. A sentence is pushed in pieces of `PIECE_S`; when the
session's queue is full (the text runs ahead of real time) the speaker waits for room instead of failing.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from liveavatar import tts
from liveavatar.errors import LiveAvatarError
from liveavatar.media import audio as audio_io

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
PIECE_S = 1.0  # speech pushed at a time
FULL_WAIT_S = 0.1  # how long to wait for room in a full queue before trying again


def to_speech_rate(speech: tts.Speech) -> np.ndarray:
    """16 kHz mono float32, decoded and resampled as an uploaded speech file is (through a WAV file)."""
    with tempfile.TemporaryDirectory(prefix="liveavatar-tts-") as folder:
        path = tts.write_wav(Path(folder) / "speech.wav", speech)
        return audio_io.load_audio(path, SAMPLE_RATE)


class TextSpeaker:
    """Speaks text into `session` (anything with `push(samples) -> position`, e.g. a LiveSession).

    `on_event(dict)` is called from the speaker's thread: {"type": "speech", "text": sentence, "speech_start":
    position in everything pushed, "speech_samples": n, "synthesis_ms": ...} once a sentence is queued whole,
    and {"type": "error", "detail": ...} when one cannot be synthesised.
    """

    def __init__(self, session, engine: str | None = None, voice: str | None = None,
                 on_event: Callable[[dict], None] | None = None, max_chars: int = tts.MAX_TEXT_CHARS):
        self.session = session
        self.engine, self.voice = engine, voice
        self.on_event = on_event or (lambda event: None)
        self.max_chars = max_chars
        self.sentences_spoken = 0
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def say(self, text: str | None, engine: str | None = None, voice: str | None = None) -> list[str]:
        """Checks the text, the engine and the voice (raising TTSError at once) and queues the text's sentences;
        returns them."""
        for what, value in (("text", text), ("tts", engine), ("voice", voice)):
            if value is not None and not isinstance(value, str):  # e.g. a number in a client's JSON
                raise tts.TTSError(f"{what}: expected a string, got {type(value).__name__}")
        text = tts.check_text(text, self.max_chars)
        name = engine or self.engine
        chosen = tts.get_engine(name)
        voice = chosen.check_voice(voice or self.voice)
        sentences = tts.split_sentences(text)
        with self._lock:
            if self._closed.is_set():
                raise LiveAvatarError("the live session is closed")
            for sentence in sentences:
                self._queue.put((sentence, chosen, voice))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="liveavatar-tts", daemon=True)
                self._thread.start()
        return sentences

    def close(self) -> None:
        """Stops after the sentence being pushed; what is still queued is dropped."""
        with self._lock:
            self._closed.set()
            self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        """Sentences not yet pushed whole."""
        return self._queue.qsize()

    def _run(self) -> None:
        while not self._closed.is_set():
            item = self._queue.get()
            if item is None:
                return
            sentence, engine, voice = item
            t0 = time.perf_counter()
            try:
                samples = to_speech_rate(engine.synthesize(sentence, voice))
            except Exception as e:  # one sentence that fails does not end the session
                log.warning("could not synthesise %r: %s", sentence, e)
                self.on_event({"type": "error", "detail": f"text-to-speech failed for {sentence[:40]!r}: {e}"})
                continue
            synthesis_ms = (time.perf_counter() - t0) * 1000
            start = self._push(samples)
            if start is None:
                return
            self.sentences_spoken += 1
            self.on_event({"type": "speech", "text": sentence, "speech_start": start, "speech_samples": len(samples),
                           "synthesis_ms": round(synthesis_ms, 1)})

    def _push(self, samples: np.ndarray) -> int | None:
        """Pushes the samples in pieces, waiting while the session's queue is full; the position of the first
        sample, or None once the speaker or the session is closed."""
        from liveavatar.engine.live import SpeechQueueFull

        piece = int(PIECE_S * SAMPLE_RATE)
        start = None
        at = 0
        while at < len(samples):
            if self._closed.is_set():
                return None
            try:
                position = self.session.push(samples[at : at + piece])
            except SpeechQueueFull:
                time.sleep(FULL_WAIT_S)
                continue
            except LiveAvatarError:  # the session was closed
                return None
            start = position if start is None else start
            at += piece
        return start
