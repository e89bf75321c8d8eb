"""A generation job: inputs -> streamed MP4 (+ latents, run log, JSON summary), resumable after a kill.

The command line, the web UI and the server all run jobs through `run_job`, which yields progress after
every block.

Timing. The stream drops the first 3 frames it decodes (they follow the static warm-up; the original does
the same), so its output frame j shows the speech the model heard at (j + 3) / 25 s. A job puts 120 ms of
silence (`LEAD_IN_FRAMES` frames) in front of the speech the model hears, so the dropped frames fall on that
silence and output frame j shows the speech at j / 25 s: the video starts with the speech's first sample and
the whole speech is muxed. `JobSpec(lead_in=False)` (`generate --original_timing`) is the original's exact
path, which the golden parity tests check: the model hears the speech from its first sample, and the video
and its sound start 120 ms into it. Either way the video ends with the speech, on the first frame that
shows its last sample (at most 40 ms after it), unless `num_clip` asks for whole clips.

Sound. The model hears 16 kHz mono; the video's sound track is the user's file itself, the same stretch at
its own rate and channels (AAC, 192 kb/s; `liveavatar.media.audio.SpeechTrack`), aligned as above.

Files written next to the output `out.mp4`:

    out.mp4.partial        the fragmented MP4 while generating (playable; moved to out.mp4 at the end)
    out.mp4.resume/        resume states (stream caches + counters) after each completed clip
    out.log                the run log (parameters, per-block stage timings, device, peak memory)
    out.json               machine-readable summary
    out.gpu_memory.csv     GPU memory samples, one per block (CUDA only)
    out.speech.wav         a text job's synthesised speech (kept for --resume; removed when the job is done)
"""

from __future__ import annotations

import errno
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import resource
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from liveavatar.engine.audio_source import clips_covered
from liveavatar.engine.multi_person import Speakers, mix_tracks, routing_masks, token_grid
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.stream import DROPPED_FIRST_FRAMES, FRAMES_PER_LATENT, Block, StreamSettings
from liveavatar.errors import DiskFull, InputError, JobStopped, OutOfMemory
from liveavatar.media import audio as audio_io
from liveavatar.media import image as image_io
from liveavatar.media.audio import SpeechTrack
from liveavatar.media.video import PARTIAL_SUFFIX, RESUME_SOURCE_SUFFIX, FragmentedMP4Writer
from liveavatar.models.text_encoder import clean_prompt

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
STATE_DIR_SUFFIX = ".resume"
STATES_KEPT = 2  # the newest state may be ahead of what reached the MP4; the one before never is
MAX_SEED = 2**63 - 1  # the noise generator takes seed + clip as a 64-bit integer
# wav2vec2 needs 400 samples (25 ms) for its first frame and one 20 ms hop more for one 30 fps feature frame.
MIN_SPEECH_SAMPLES = 720
# Disk space the preflight asks for: the video at a bit rate H.264 (CRF 18) stays under for a talking head
# (the random test models' noise-like frames take about 3 bits per pixel), plus room for the run log, the
# summary and a resume state. A disk that fills up anyway is reported when a write fails (DiskFull).
VIDEO_BITS_PER_PIXEL = 0.5
MIN_FREE_BYTES = 100 * 2**20
# Silence in front of the speech the model hears: the frames the stream drops (see the module notes).
LEAD_IN_FRAMES = DROPPED_FIRST_FRAMES
# The layout of the resume states: 2 since the lead-in and the file's own sound track (states without it were
# saved by a version whose videos started 120 ms into the speech with 16 kHz mono sound; they are refused).
STATE_LAYOUT = 2


@dataclass
class JobSpec:
    image: Path
    audio: Path
    prompt: str
    output: Path
    size: str = "704*384"
    num_clip: int | None = None  # None: as many clips as the audio covers
    infer_frames: int = 48
    sample_steps: int = 4
    seed: int = 42
    save_latents: Path | None = None
    resume: bool = False
    trim_silence: bool = False
    normalize_loudness: bool = False
    rolling_sink: bool = True  # see StreamSettings.rolling_sink
    fps: int = 25
    max_audio_s: float | None = None  # longer speech is refused (the services' limit; the command line has none)
    # 120 ms of silence before the speech the model hears, so the video has the whole speech (module notes).
    # False: the original's exact timing (what the golden data checks); the video starts 120 ms into the speech.
    lead_in: bool = True
    overwrite: bool = False  # an interrupted run's partial video and resume states are deleted, not refused
    # A text job: `text` is spoken by the `tts` engine with `voice` into the file `audio` (see synthesize_text),
    # which then goes the way of any speech file.
    text: str | None = None
    voice: str | None = None
    tts: str | None = None
    # Several people in the picture (multi-person mode): every person's speech track, the first being `audio`,
    # and their masks (or None: found by their faces). None: one speaker, `audio`.
    speakers: Speakers | None = None

    def fingerprint(self) -> str:
        """Identifies the inputs and settings whose output a resume state belongs to."""
        h = hashlib.sha256()
        for path in (self.image, self.audio):
            h.update(Path(path).read_bytes())
        if self.speakers is not None:
            for path in self.speakers.audio + (self.speakers.masks or ()):
                h.update(Path(path).read_bytes())
        for value in (self.prompt, self.size, self.num_clip, self.infer_frames, self.sample_steps, self.seed,
                      self.trim_silence, self.normalize_loudness, self.rolling_sink, self.lead_in):
            h.update(repr(value).encode())
        if self.text is not None:  # (audio jobs keep the fingerprints they had before text jobs existed)
            h.update(repr((self.text, self.tts, self.voice)).encode())
        return h.hexdigest()

    @property
    def lead_in_samples(self) -> int:
        """16 kHz samples of silence in front of the speech the model hears."""
        return LEAD_IN_FRAMES * SAMPLE_RATE // self.fps if self.lead_in else 0


@dataclass
class Speech:
    """A job's speech: what the model hears, and the video's sound track."""

    wave: np.ndarray  # the speech at 16 kHz mono (trimmed and normalised if asked), without the lead-in
    # The sound track from output frame 0 on: the same speech in the user's file (its own rate and channels), or
    # with several people the mean of their tracks (16 kHz mono samples).
    track: SpeechTrack | np.ndarray
    lead_in_samples: int = 0
    people: list[np.ndarray] | None = None  # several people: each one's speech, in the order of the people

    @property
    def heard(self) -> np.ndarray | list[np.ndarray]:
        """What the model hears: the lead-in silence, then the speech (several people: one such wave each)."""
        if self.people is not None:
            return [self._lead(w) for w in self.people]
        return self._lead(self.wave)

    def _lead(self, wave: np.ndarray) -> np.ndarray:
        if not self.lead_in_samples:
            return wave
        return np.concatenate([np.zeros(self.lead_in_samples, np.float32), wave])


@dataclass(frozen=True)
class Plan:
    """How much a job generates: clips and blocks of the stream, and the frames of the video."""

    clips_covered: int  # clips the speech the model hears reaches into (the original's count)
    clips: int
    blocks: int
    frames: int


@dataclass
class Progress:
    block: Block | None  # None where only the counts are kept (a service's task view)
    blocks_done: int
    blocks_total: int
    frames_done: int
    frames_total: int
    elapsed_s: float
    notices: tuple[str, ...] = ()  # what the preflight warned about (a small image, --num_clip beyond the speech)


@dataclass
class JobResult:
    output: Path
    frames: int
    clips: int
    height: int
    width: int
    seconds: float  # wall time of the whole job
    first_frame_s: float
    generation_fps: float  # video frames generated per second of wall time (the video itself plays at spec.fps)
    resumed_from_block: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)
    peak_gpu_memory_gb: float | None = None
    peak_host_memory_gb: float = 0.0
    notices: list[str] = field(default_factory=list)  # what the preflight warned about (a small image, ...)


def speech_file_for(output: Path) -> Path:
    """Where a text job run from the command line keeps its synthesised speech: out.speech.wav."""
    return Path(output).with_suffix(".speech.wav")


def synthesize_text(spec: JobSpec, reuse: bool = False) -> None:
    """A text job's speech: speaks `spec.text` with its engine and voice into `spec.audio` (a WAV file at the
    engine's rate), which the job then decodes, resamples and trims like an uploaded file. With `reuse`, a
    file already there is kept (a resumed job must speak exactly what the interrupted run spoke; the resume
    state's fingerprint holds the text, engine and voice). Raises TTSError (an InputError) for empty or too
    long text and an unknown or missing engine or voice."""
    from liveavatar import tts

    if spec.text is None:
        return
    if reuse and Path(spec.audio).is_file():
        log.info("speaking the text as synthesised before: %s", spec.audio)
        return
    _check_output_path(Path(spec.audio))
    t0 = time.perf_counter()
    tts.synthesize_file(spec.text, spec.audio, spec.tts, spec.voice)
    log.info("synthesised %d characters of text with %s (voice %s) in %.2f s", len(spec.text),
             spec.tts or tts.DEFAULT_ENGINE, spec.voice or "default", time.perf_counter() - t0)


def load_speech(spec: JobSpec) -> np.ndarray:
    """The job's speech at 16 kHz mono, trimmed and normalised if asked (without the lead-in); with several
    people, the mean of their tracks cut to the shortest."""
    return read_speech(spec, with_track=False).wave


def read_speech(spec: JobSpec, with_track: bool = True) -> Speech:
    """The job's speech: the 16 kHz mono wave the model hears (after the lead-in) and the stretch of the user's
    file that is the video's sound track (the same samples in time: trimmed and normalised alike). Several
    people: each person's speech, and as the sound track the mean of the tracks cut to the shortest (16 kHz
    mono, as the original muxes them)."""
    if spec.speakers is not None:
        people = [read_speech(replace(spec, audio=path, speakers=None), with_track=False).wave
                  for path in spec.speakers.audio]
        mixed = mix_tracks(people)
        skipped = 0 if spec.lead_in else DROPPED_FIRST_FRAMES * SAMPLE_RATE // spec.fps
        return Speech(mixed, mixed[skipped:], spec.lead_in_samples, people)
    wave = audio_io.load_audio(spec.audio, SAMPLE_RATE, max_seconds=spec.max_audio_s)
    start, stop = 0, len(wave)
    if spec.trim_silence:
        start, stop = audio_io.silence_bounds(wave, SAMPLE_RATE)
        wave = wave[start:stop]
    gain = None
    if spec.normalize_loudness:
        gain = audio_io.loudness_gain(wave, SAMPLE_RATE)
        if gain is not None:
            wave = (wave * np.float32(gain)).astype(np.float32)
    if len(wave) < MIN_SPEECH_SAMPLES:
        raise InputError(f"{spec.audio}: the audio is {len(wave) / SAMPLE_RATE * 1000:.0f} ms long; at least "
                         f"{MIN_SPEECH_SAMPLES / SAMPLE_RATE * 1000:.0f} ms are needed")
    # Output frame 0 shows the speech at 0 s with the lead-in, at 0.12 s without it (the original's timing).
    skipped = 0.0 if spec.lead_in else DROPPED_FIRST_FRAMES / spec.fps
    track = SpeechTrack(Path(spec.audio), start_s=start / SAMPLE_RATE + skipped,
                        duration_s=max(0.0, len(wave) / SAMPLE_RATE - skipped))
    if gain is not None and with_track:
        # The gain was limited by the 16 kHz mono peak; the file's own channels and rate may peak higher.
        with track.open() as reader:
            peak = reader.peak()
        track = dataclasses.replace(track, gain=min(gain, 1.0 / peak) if peak * gain > 1.0 else gain)
    return Speech(wave, track, spec.lead_in_samples)


def plan(spec: JobSpec, speech_samples: int) -> Plan:
    """The clips, blocks and frames of a job whose speech (without the lead-in) has `speech_samples` samples.

    By default the video ends with the speech: on the first frame that shows its last sample (at most one frame,
    40 ms, after it), and only the blocks up to that frame are generated. An explicit `num_clip` gets that many
    whole clips (capped at the clips the speech covers, as in the original)."""
    heard = speech_samples + spec.lead_in_samples
    block_frames = FRAMES_PER_LATENT * StreamSettings.latent_frames_per_block
    blocks_per_clip = spec.infer_frames // block_frames
    covered = clips_covered(heard, spec.fps, spec.infer_frames)
    if spec.num_clip is not None:
        clips = min(spec.num_clip, covered)
        return Plan(covered, clips, clips * blocks_per_clip, clips * spec.infer_frames - DROPPED_FIRST_FRAMES)
    # Output frame j shows the heard audio at (j + 3) / fps: the last frame is the one that reaches its end.
    frames = max(1, -(-heard * spec.fps // SAMPLE_RATE) - DROPPED_FIRST_FRAMES)
    frames = min(frames, covered * spec.infer_frames - DROPPED_FIRST_FRAMES)
    blocks = 1 + math.ceil(max(0, frames - (block_frames - DROPPED_FIRST_FRAMES)) / block_frames)
    return Plan(covered, math.ceil(blocks / blocks_per_clip), blocks, frames)


def preflight(spec: JobSpec, notices: list[str] | None = None) -> np.ndarray:
    """Checks everything that can be checked before any model work and returns the speech (16 kHz mono, without
    the lead-in): options, the prompt, both inputs decoded, the output folder (created, writable) and the free
    disk space. What deserves a word but is no error (a small image, --num_clip beyond the speech) is appended
    to `notices` if given, else logged as warnings."""
    found: list[str] = []
    wave = _preflight(spec, found)[0].wave
    if notices is not None:
        notices.extend(found)
    else:
        for notice in found:
            log.warning("%s", notice)
    return wave


@dataclass
class PeopleMasks:
    """Multi-person mode: the people's masks [A, H_img, W_img] bool, and the faces they were made from when
    they were found automatically (None: given)."""

    masks: np.ndarray
    faces: list | None = None


def check_speakers(spec: JobSpec, height: int, width: int) -> PeopleMasks | None:
    """Multi-person mode: the masks of the people (given, or found by their faces), checked against the speech
    tracks and the transformer's token grid at the output size H x W; None for one speaker."""
    from liveavatar.media import faces as faces_io
    from liveavatar.media.masks import load_masks

    speakers = spec.speakers
    if speakers is None:
        return None
    tracks = len(speakers.audio)
    if tracks < 2:
        raise InputError("several people need two or more speech tracks (a.wav+b.wav); with one track the whole "
                         "picture speaks and takes no mask")
    if Path(speakers.audio[0]) != Path(spec.audio):
        raise InputError(f"the first speech track {speakers.audio[0]} is not the job's audio {spec.audio}")
    if speakers.masks is None:
        masks, found = faces_io.automatic_masks(spec.image, tracks)
    else:
        if len(speakers.masks) != tracks:
            raise InputError(f"{len(speakers.masks)} mask(s) for {tracks} speech tracks: give one mask per track, "
                             f"in the same order (a.png+b.png; white = that person)")
        masks, found = load_masks(speakers.masks, image_io.load_image(spec.image).size), None
    routing = routing_masks(masks, token_grid(height, width, spec.infer_frames))
    routed = routing.logits[0].sum(dim=0)
    for a in range(tracks):
        if routed[a] == 0:
            name = f"person {a + 1}'s region" if found is not None else str(speakers.masks[a])
            raise InputError(f"{name} covers no token of the {width // 16}x{height // 16} grid at {width}x{height} "
                             f"(each token is 16x16 output pixels; later masks win where they overlap): make it larger")
    return PeopleMasks(masks, found)


def _preflight(spec: JobSpec, notices: list[str], with_track: bool = False) -> tuple[Speech, Plan, PeopleMasks | None]:
    area = image_io.parse_size(spec.size)
    block_frames = FRAMES_PER_LATENT * StreamSettings.latent_frames_per_block
    if spec.infer_frames < block_frames or spec.infer_frames % block_frames:
        raise InputError(f"--infer_frames {spec.infer_frames}: must be a positive multiple of {block_frames}")
    if spec.sample_steps < 1:
        raise InputError(f"--sample_steps {spec.sample_steps}: must be at least 1")
    if spec.num_clip is not None and spec.num_clip < 1:
        raise InputError(f"--num_clip must be at least 1, got {spec.num_clip}")
    if not 0 <= spec.seed <= MAX_SEED:
        raise InputError(f"--base_seed {spec.seed}: must be between 0 and {MAX_SEED} (the original scripts took a "
                         f"negative seed to mean a random one; pass the number to use)")
    _check_prompt(spec.prompt)
    if spec.resume and spec.overwrite:
        raise InputError("--resume and --overwrite: choose one (continue the interrupted run, or start it over)")
    if Path(spec.output).is_dir():
        raise InputError(f"{spec.output}: is a folder; expected a file name to write, such as "
                         f"{Path(spec.output) / 'out.mp4'}")
    if spec.output.suffix.lower() != ".mp4":
        raise InputError(f"{spec.output}: the output must be an .mp4 file")
    for path, what in ((spec.image, "reference image"), (spec.audio, "audio" if spec.text is None else "synthesised speech")):
        if not Path(path).is_file():
            raise InputError(f"{path}: {what} not found")
    if spec.speakers is not None:
        for path in spec.speakers.audio:
            if not Path(path).is_file():
                raise InputError(f"{path}: audio not found")
    img = image_io.load_image(spec.image)
    height, width = image_io.output_size(img.height, img.width, area)
    people = check_speakers(spec, height, width)
    small = image_io.small_image_notice(img.width, img.height, width, height, area, spec.size)
    if small is not None:
        notices.append(small)
    speech = read_speech(spec, with_track=with_track)
    job_plan = plan(spec, len(speech.wave))
    for path in (spec.output, spec.save_latents):
        if path is not None:
            _check_output_path(Path(path))
    partial = Path(str(spec.output) + PARTIAL_SUFFIX)
    if partial.exists() and not spec.resume and not spec.overwrite:
        raise InputError(f"{partial} exists from an interrupted run: pass --resume to continue it, or --overwrite to "
                         f"start over")
    out_dir = Path(spec.output).resolve().parent
    frames = job_plan.frames
    needed = int(frames * width * height * VIDEO_BITS_PER_PIXEL / 8) + MIN_FREE_BYTES
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise InputError(f"{out_dir}: not enough free disk space: {free / 2**20:.0f} MB free, about "
                         f"{needed / 2**20:.0f} MB needed ({frames} frames of {width}x{height}, the run log and "
                         f"a resume state)")
    if spec.num_clip is not None and spec.num_clip > job_plan.clips_covered:
        notices.append(f"--num_clip {spec.num_clip}: the speech covers only {job_plan.clips_covered} clip(s) of "
                       f"{spec.infer_frames} frames; generating {job_plan.clips} (a longer speech makes more)")
    return speech, job_plan, people


def _check_prompt(prompt: str) -> None:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(prompt[e.start])
        # Undecodable bytes of a command line arrive as U+DC80..U+DCFF (Python's surrogateescape).
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
        raise InputError(f"the prompt is not UTF-8 text ({what} at character {e.start}); pass it UTF-8 encoded") from None


def _check_output_path(path: Path) -> None:
    """The file's folder exists (it is created) and takes new files, and the file itself is not a folder."""
    folder = path.resolve().parent
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file, not a folder to write {path.name} into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{folder}: cannot create the output folder ({e.strerror})") from None
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a file name to write")
    # Creating a file, not os.access: that also fails on an exhausted quota or inode table, and on network file
    # systems whose permissions the client cannot judge.
    try:
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".liveavatar-probe-")
    except OSError as e:
        raise InputError(f"{folder}: the output folder is not writable ({e.strerror})") from None
    probe.close()


class ResumeStore:
    """Resume states in <output>.resume/, written atomically; the newest two are kept."""

    def __init__(self, output: Path, fingerprint: str, lead_in: bool = True):
        self.dir = Path(str(output) + STATE_DIR_SUFFIX)
        self.partial = Path(str(output) + PARTIAL_SUFFIX)
        self.fingerprint = fingerprint
        self.lead_in = lead_in

    def save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"state-{state['stream']['next_block']:09d}.pt"
        tmp = path.with_suffix(".tmp")
        try:
            # Through a Python file: a full disk then raises OSError (ENOSPC), not an opaque RuntimeError.
            with tmp.open("wb") as f:
                torch.save({**state, "fingerprint": self.fingerprint, "layout": STATE_LAYOUT,
                            "lead_in": self.lead_in}, f)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename is None:
                e.filename = str(path)  # a failed write() names no file
            raise
        os.replace(tmp, path)
        for old in sorted(self.dir.glob("state-*.pt"))[:-STATES_KEPT]:
            old.unlink()

    def latest_usable(self, complete_frames: set[int]) -> dict | None:
        """The newest state whose frames all reached the partial MP4."""
        start_over = f"delete {self.dir} and {self.partial}, or rerun with --overwrite, to start over"
        for path in sorted(self.dir.glob("state-*.pt"), reverse=True):
            state = torch.load(path, map_location="cpu", weights_only=False)
            if state.get("layout") != STATE_LAYOUT:
                raise InputError(f"{path}: saved by an earlier liveavatar, whose video started 120 ms into the speech "
                                 f"with 16 kHz mono sound; this version cannot continue it: {start_over}")
            if state.get("fingerprint") != self.fingerprint or state.get("lead_in") != self.lead_in:
                raise InputError(f"{path}: belongs to a run with other inputs or settings; {start_over}")
            if state["stream"]["frames_emitted"] in complete_frames:
                return state
        return None

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class OutputThread:
    """Encodes and writes the video (and saves resume states) on a thread of its own, in the order given, so
    that H.264 encoding overlaps the generation of the next blocks rather than pacing it. A resume state is
    saved only after the frames before it are in the file, as when written in line. At most `max_waiting`
    pieces of work wait (a block's frames are a few MB): when encoding is slower than generating, the job
    waits here. An error on the thread is raised, with its own type, by the job's next call."""

    def __init__(self, writer: FragmentedMP4Writer, max_waiting: int = 2):
        self.writer = writer
        self.mux_ms: list[float] = []  # per block written, in order
        self._waiting: queue.Queue = queue.Queue(max_waiting)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="liveavatar-output", daemon=True)
        self._thread.start()

    def write(self, frames: np.ndarray) -> None:
        self._put(lambda: self._write(frames))

    def save_state(self, store: "ResumeStore", state: dict) -> None:
        self._put(lambda: store.save(state))

    def drain(self) -> None:
        """Waits until everything given so far is done; raises the thread's error if there was one."""
        self._waiting.join()
        self._raise()

    def stop(self) -> None:
        """Finishes what was given (unless an error stopped the thread) and ends the thread; raises nothing."""
        if self._thread.is_alive():
            self._waiting.put(None)
            self._thread.join()

    def _write(self, frames: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.writer.write(frames)
        self.mux_ms.append((time.perf_counter() - t0) * 1000)
        log.debug("muxed %d frames in %.1f ms", len(frames), self.mux_ms[-1])

    def _put(self, work: Callable[[], None]) -> None:
        self._raise()
        self._waiting.put(work)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            work = self._waiting.get()
            try:
                if work is None:
                    return
                if self._error is None:  # after an error the rest is skipped; the job raises it
                    work()
            except BaseException as e:
                self._error = e
            finally:
                self._waiting.task_done()


def run_job(
    pipe: LiveAvatarPipeline, spec: JobSpec, should_stop: Callable[[], bool] | None = None,
    log_notices: bool = True,
) -> Iterator[Progress | JobResult]:
    """Runs a job, yielding a Progress after every block and the JobResult last.

    `should_stop` is polled after every block: when it returns True the job saves a resume state at that
    block, finalises the partial MP4 (playable, with everything generated so far) and raises JobStopped.
    The preflight's notices are logged as warnings unless `log_notices` is False (the command line shows them
    before it loads the model); the JobResult carries them either way.
    """
    t_start = time.perf_counter()
    notices: list[str] = []
    speech, job_plan, people = _preflight(spec, notices, with_track=True)
    for notice in notices if log_notices else ():
        log.warning("%s", notice)
    _note_prompt_truncation(pipe, spec.prompt)
    settings = StreamSettings(frames_per_clip=spec.infer_frames, sample_steps=spec.sample_steps, seed=spec.seed,
                              fps=spec.fps, rolling_sink=spec.rolling_sink)
    masks = None if people is None else people.masks
    if people is not None:
        _log_people(spec, speech, people)
    cond = pipe.prepare(spec.image, speech.heard, spec.prompt, spec.size, fps=spec.fps,
                        frames_per_clip=spec.infer_frames, masks=masks)
    cuda = pipe.device.type == "cuda"
    prepare_peak = torch.cuda.max_memory_allocated() if cuda else 0  # a stream may reset the peak (offload mode)
    num_clips = min(job_plan.clips, cond.num_clips)
    blocks_total = min(job_plan.blocks, num_clips * settings.blocks_per_clip)
    frames_total = min(job_plan.frames, blocks_total * settings.video_frames_per_block - DROPPED_FIRST_FRAMES)
    log.info("output %dx%d, %d clip(s) of %d frames (the audio covers %d), decoder %s", cond.width, cond.height,
             num_clips, spec.infer_frames, cond.num_clips, pipe.decoder_name)
    log.info("video: %d frames (%.2f s) of %d block(s); speech %.2f s, %s", frames_total, frames_total / spec.fps,
             blocks_total, len(speech.wave) / SAMPLE_RATE,
             "with 120 ms of silence in front for the model" if spec.lead_in else "the original's timing")
    stream = pipe.stream(cond, settings)
    if spec.resume and not stream.resumable:
        raise InputError("--resume: this pipeline's caches live in several processes and are not saved; "
                         "a run on one GPU can be resumed")

    store = ResumeStore(spec.output, spec.fingerprint(), spec.lead_in)
    latents: list[torch.Tensor] = []
    partial = Path(str(spec.output) + PARTIAL_SUFFIX)
    resumed_from = 0
    state = None
    if spec.resume and (partial.exists() or Path(str(partial) + RESUME_SOURCE_SUFFIX).exists()):
        points = set(FragmentedMP4Writer.resume_points(partial if partial.exists() else Path(str(partial) + RESUME_SOURCE_SUFFIX)))
        state = store.latest_usable(points) if store.dir.exists() else None
    if state is not None:
        stream.load_state_dict(state["stream"])
        latents = [state["latents"]] if state.get("latents") is not None else []
        resumed_from = stream.next_block
        writer = FragmentedMP4Writer.resume(partial, state["stream"]["frames_emitted"], cond.width, cond.height,
                                            spec.fps, speech.track, SAMPLE_RATE)
        log.info("resuming at block %d (frame %d)", resumed_from, stream.frames_emitted)
    else:
        if spec.resume:
            log.info("no usable resume state for %s; starting from the beginning", spec.output)
        partial.unlink(missing_ok=True)
        Path(str(partial) + RESUME_SOURCE_SUFFIX).unlink(missing_ok=True)
        store.clear()
        writer = FragmentedMP4Writer(spec.output, cond.width, cond.height, spec.fps, speech.track, SAMPLE_RATE)

    stage_ms: dict[str, float] = {}
    first_frame_s = None
    written = stream.frames_emitted  # frames in the file: the last block is cut where the video ends
    output = OutputThread(writer)
    t_loop = time.perf_counter()
    try:
        for block in stream.blocks(num_clips, blocks_total):
            if written + len(block.frames) > frames_total:
                block = dataclasses.replace(block, frames=block.frames[: frames_total - written])
            output.write(block.frames.numpy())
            written += len(block.frames)
            for k, v in block.timings_ms.items():
                stage_ms[k] = stage_ms.get(k, 0.0) + v
            if first_frame_s is None:
                first_frame_s = time.perf_counter() - t_loop
            if spec.save_latents is not None:
                latents.append(block.latents)
            if stream.resumable and (block.index + 1) % settings.blocks_per_clip == 0 and block.index + 1 < blocks_total:
                kept = torch.cat(latents, dim=1) if latents else None
                latents = [kept] if kept is not None else []
                output.save_state(store, {"stream": stream.state_dict(), "latents": kept})
            log.debug("block %d: %s", block.index, {k: round(v, 1) for k, v in block.timings_ms.items()})
            yield Progress(block, block.index + 1, blocks_total, written, frames_total, time.perf_counter() - t_start,
                           tuple(notices))
            if should_stop is not None and should_stop() and block.index + 1 < blocks_total:
                if stream.resumable:
                    kept = torch.cat(latents, dim=1) if latents else None
                    output.save_state(store, {"stream": stream.state_dict(), "latents": kept})
                output.drain()
                writer.abort()  # closes the container: the last block's fragment reaches the disk
                raise JobStopped(
                    f"stopped after {written} of {frames_total} frames: {partial} plays what was "
                    f"generated" + ("; rerun the same command with --resume to continue" if stream.resumable else "")
                )
        output.drain()
        if spec.save_latents is not None:
            _save_latents(spec.save_latents, torch.cat(latents, dim=1))
        result_path = writer.close()
    except JobStopped:
        raise
    except BaseException as e:
        output.stop()  # the blocks made before the error still reach the file
        try:
            writer.abort()
        except OSError:  # e.g. the disk is full: the file stays valid up to its last complete block
            pass
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise OutOfMemory(
                f"GPU out of memory at {cond.width}x{cond.height}: use a smaller --size (e.g. 688*368 or 384*256), "
                f"--offload_model True, or --fp8; the {_frames_on_disk(partial)} frames made so far are in {partial} "
                f"(rerun with --resume to continue)"
            ) from None
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFull(
                f"disk full while writing {e.filename or partial}: the {_frames_on_disk(partial)} frames written so "
                f"far are kept (playable in {partial.name}); free space and rerun with --resume to continue"
            ) from None
        raise
    finally:
        output.stop()
    if output.mux_ms:
        stage_ms["mux"] = sum(output.mux_ms)
    store.clear()
    seconds = time.perf_counter() - t_start
    loop_s = time.perf_counter() - t_loop
    blocks_run = blocks_total - resumed_from
    made = stream.frames_emitted if not resumed_from else blocks_run * settings.video_frames_per_block
    result = JobResult(
        output=result_path, frames=written, clips=num_clips, height=cond.height, width=cond.width, seconds=seconds,
        first_frame_s=first_frame_s or 0.0, generation_fps=made / loop_s,
        resumed_from_block=resumed_from, stage_ms={k: v / max(1, blocks_run) for k, v in stage_ms.items()},
        peak_gpu_memory_gb=max(prepare_peak, torch.cuda.max_memory_allocated()) / 2**30 if cuda else None,
        peak_host_memory_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # ru_maxrss is in KiB
        notices=notices,
    )
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    summary["spec"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()}
    summary["device"] = str(pipe.device)
    summary["decoder"] = pipe.decoder_name
    summary["audio"] = {"sample_rate": writer.sample_rate, "channels": writer.audio_channels,
                        "speech_s": round(len(speech.wave) / SAMPLE_RATE, 4),
                        "video_s": round(written / spec.fps, 4)}
    try:
        _write_json(spec.output.with_suffix(".json"), summary)
    except OSError as e:  # the video is complete and in place; only its summary is missing
        log.warning("could not write the summary %s (%s)", spec.output.with_suffix(".json"), e.strerror)
    yield result


def _log_people(spec: JobSpec, speech: Speech, people: PeopleMasks) -> None:
    """Multi-person mode: names each person's region and speech in the log."""
    for a, (path, wave) in enumerate(zip(spec.speakers.audio, speech.people)):
        where = f"face {people.faces[a]}" if people.faces is not None else f"mask {spec.speakers.masks[a]}"
        log.info("person %d (%s): speech %s, %.2f s", a + 1, where, path, len(wave) / SAMPLE_RATE)
    how = "found by their faces, numbered left to right" if people.faces is not None else "given"
    log.info("%d people (%s); the video covers the shortest track (%.2f s) and its sound is the mean of the tracks",
             len(speech.people), how, len(speech.wave) / SAMPLE_RATE)


def _note_prompt_truncation(pipe: LiveAvatarPipeline, prompt: str) -> None:
    encoder = pipe.text_encoder
    tokens = len(encoder.tokenizer(clean_prompt(prompt), add_special_tokens=True)["input_ids"])
    if tokens > encoder.text_len:
        log.warning("the prompt is %d tokens long; only its first %d are used", tokens, encoder.text_len)


def _frames_on_disk(partial: Path) -> int:
    """Complete frames in a partial MP4 left by a failed run (what plays and what a resume keeps)."""
    try:
        return FragmentedMP4Writer.resume_points(partial)[-1] if partial.exists() else 0
    except (InputError, OSError, av.FFmpegError):
        return 0


def _save_latents(path: Path, latents: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        # Bytes written through a Python file, so that a full disk raises OSError (ENOSPC).
        tmp.write_bytes(safetensors_bytes({"latents": latents.contiguous()}))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))  # str: the paths inside nested options
    os.replace(tmp, path)
