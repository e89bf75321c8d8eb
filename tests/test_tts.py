"""Text in (TTS): the engines, `generate --text` end to end on the tiny golden checkpoints, the original's flags,
one-line errors, Piper with a stand-in voice, voice downloads (against a stand-in hub), and the live speaker."""

import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CKPT, REPO, requires_golden
from liveavatar import tts
from liveavatar.engine.audio_source import clips_covered
from liveavatar.engine.job import JobSpec, speech_file_for, synthesize_text
from liveavatar.interfaces.cli import main
from liveavatar.media.audio import load_audio
from liveavatar.media.video import read_video
from liveavatar.tts.piper import PiperEngine
from liveavatar.tts.speaker import TextSpeaker, to_speech_rate

FACE = REPO / "examples" / "face.png"
CPU = ["--ckpt_dir", str(CKPT), "--device", "cpu", "--dtype", "float32", "--size", "128*128"]
TEXT = "Hello there. I am a talking avatar, and I read what you type."

requires_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                     reason="eSpeak NG is not installed (Debian package espeak-ng)")
requires_piper = pytest.mark.skipif(not PiperEngine.available() or importlib.util.find_spec("onnx") is None,
                                    reason="piper-tts or onnx is not installed (pip install 'liveavatar[tts,dev]')")


def make_standin_voice(folder: Path, name: str = "xx_XX-standin-low", rate: int = 22050, hop: int = 1024) -> Path:
    """A stand-in Piper voice: an ONNX graph with a real voice's inputs and output (phoneme ids, their count, the
    three scales -> audio [1, 1, 1, samples]) that plays `hop` samples of a tone per phoneme id, its pitch
    following the id. Piper phonemises the text with its own eSpeak NG and runs this like any voice; the length
    of what it says is exactly `hop` samples per phoneme id (no network, deterministic)."""
    import onnx
    from onnx import TensorProto, helper
    from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP

    phase = (2 * np.pi * np.arange(hop) / rate).astype(np.float32).reshape(1, 1, hop)
    nodes = [
        helper.make_node("Cast", ["input"], ["ids"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["ids", "base"], ["pitch"]),
        helper.make_node("Mul", ["pitch", "step"], ["freq"]),  # (id + 25) * 4 Hz
        helper.make_node("Unsqueeze", ["freq", "axis2"], ["freq3"]),
        helper.make_node("Mul", ["freq3", "phase"], ["arg"]),
        helper.make_node("Sin", ["arg"], ["tone"]),
        helper.make_node("Mul", ["tone", "gain"], ["quiet"]),
        helper.make_node("Reshape", ["quiet", "shape"], ["output"]),
    ]
    constants = [
        helper.make_tensor("base", TensorProto.FLOAT, [], [25.0]),
        helper.make_tensor("step", TensorProto.FLOAT, [], [4.0]),
        helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("phase", TensorProto.FLOAT, list(phase.shape), phase.ravel().tolist()),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [0.3]),
        helper.make_tensor("shape", TensorProto.INT64, [4], [1, 1, 1, -1]),
    ]
    graph = helper.make_graph(
        nodes, "standin",
        [helper.make_tensor_value_info("input", TensorProto.INT64, [1, "n"]),
         helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 1, "t"])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    config = {"audio": {"sample_rate": rate}, "espeak": {"voice": "en-us"}, "num_symbols": 256, "num_speakers": 1,
              "phoneme_id_map": DEFAULT_PHONEME_ID_MAP, "hop_length": hop}
    Path(f"{path}.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def fresh_engines(monkeypatch):
    """Engines made anew in this test (and its changes to the registry undone after it)."""
    monkeypatch.setattr(tts, "_instances", {})
    monkeypatch.setattr(tts, "_ENGINES", dict(tts._ENGINES))


# ---------------------------------------------------------------------------------------------- the interface

def test_text_checks_and_sentences():
    assert tts.check_text("  Hi there.  ") == "Hi there."
    for text, message in [("", "the text to speak is empty"), ("   \n", "the text to speak is empty"),
                          ("x" * (tts.MAX_TEXT_CHARS + 1), f"the limit is {tts.MAX_TEXT_CHARS}"),
                          ("... !?", "no letters or digits"), ("bad \udcff byte", "not UTF-8")]:
        with pytest.raises(tts.TTSError, match=message.replace("?", r"\?")):
            tts.check_text(text)
    assert tts.split_sentences('Hello there. How are you?  Fine! "Quoted." Last one\n\nNew paragraph') == [
        "Hello there.", "How are you?", "Fine!", '"Quoted."', "Last one", "New paragraph"]
    assert tts.split_sentences("It costs 3.5 euros... or not. 你好。再见") == ["It costs 3.5 euros...", "or not.", "你好。", "再见"]
    long = tts.split_sentences("word, " * 100, max_chars=120)
    assert all(len(s) <= 120 for s in long) and " ".join(long).split() == ("word, " * 100).split()


def test_unknown_and_missing_engines_are_named(fresh_engines):
    with pytest.raises(tts.TTSError, match=r"unknown speech engine 'nope': pick one of espeak, piper"):
        tts.get_engine("nope")

    class Missing(tts.Engine):
        name, install_hint = "missing", "pip install missing-tts"

        @classmethod
        def available(cls):
            return False

    tts.register_engine("missing", Missing)
    with pytest.raises(tts.TTSError, match=r"^speech engine 'missing' is not installed: pip install missing-tts$"):
        tts.get_engine("missing")
    assert "missing" in tts.engine_names() and "missing" not in tts.available_engines()
    assert any(line.startswith("missing: ") and "not installed (pip install missing-tts)" in line
               for line in tts.describe_engines())


@requires_espeak
def test_espeak_speaks_with_its_voices_and_refuses_unknown_ones(fresh_engines, tmp_path):
    engine = tts.get_engine("espeak")
    voices = engine.voices()
    assert {"en-us", "de", "fr-fr"} <= set(voices) and len(voices) > 50
    assert engine.check_voice(None) == "en-us" and engine.check_voice("EN-US") == "en-us"
    assert engine.check_voice("en-us+f3") == "en-us+f3"
    with pytest.raises(tts.TTSError, match=r"unknown espeak voice 'xx-nowhere': pick a language like en-us"):
        engine.check_voice("xx-nowhere")
    with pytest.raises(tts.TTSError, match=r"unknown espeak voice variant 'zzz'"):
        engine.check_voice("en-us+zzz")
    short = tts.synthesize("Hello.")
    long = tts.synthesize(TEXT)
    assert short.sample_rate == 22050 and 0.3 < short.seconds < 1.5
    assert long.seconds > 2.5 * short.seconds, "more text, more speech"
    assert np.array_equal(tts.synthesize(TEXT).samples, long.samples), "eSpeak NG is deterministic"
    assert 0.1 < np.abs(long.samples).max() <= 1.0
    german = tts.synthesize("Guten Tag, wie geht es Ihnen?", voice="de")
    assert german.seconds > 1 and not np.array_equal(german.samples[:1000], long.samples[:1000])
    path = tts.synthesize_file(TEXT, tmp_path / "s.wav")
    speech = to_speech_rate(long)  # the upload path: decoded and resampled to 16 kHz
    assert len(speech) == pytest.approx(long.seconds * 16000, abs=2)
    assert np.array_equal(load_audio(path), speech)


@requires_espeak
def test_missing_espeak_program_names_the_package(fresh_engines, monkeypatch):
    import liveavatar.tts.espeak as espeak

    monkeypatch.setattr(espeak, "PROGRAM", "espeak-ng-not-here")
    with pytest.raises(tts.TTSError, match=r"speech engine 'espeak' is not installed: install eSpeak NG: apt-get install "
                                           r"espeak-ng \(Debian/Ubuntu\), brew install espeak-ng \(macOS\)"):
        tts.synthesize("Hello.")


# ------------------------------------------------------------------------------------------ generate --text

def _audio_correlation(got: np.ndarray, want: np.ndarray) -> float:
    n = min(len(got), len(want))
    return float(np.corrcoef(got[:n], want[:n])[0, 1])


@requires_golden
@requires_espeak
def test_generate_text_writes_the_spoken_text(tmp_path, capsys):
    out = tmp_path / "talk.mp4"
    assert main(["generate", "--image", str(FACE), "--text", TEXT, "--save_file", str(out), *CPU]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    speech = to_speech_rate(tts.synthesize(TEXT))  # what the job should have spoken, at 16 kHz
    frames, fps, audio, rate = read_video(out)
    # The video covers the speech, more than a clip of it, and ends with it (on the frame showing its last sample) ...
    assert clips_covered(len(speech)) >= 2 and fps == 25
    assert frames.shape == (-(-len(speech) // 640), 128, 128, 3)
    # ... and its sound is that speech, whole (from its first sample), at the synthesised file's own rate.
    assert rate == tts.synthesize(TEXT).sample_rate
    sound = load_audio(out)  # the sound track at 16 kHz, as the speech above
    assert abs(len(sound) - len(speech)) < 0.05 * 16000
    assert _audio_correlation(sound, speech) > 0.95
    assert not speech_file_for(out).exists(), "the synthesised speech is removed once it is in the video"
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["spec"]["text"] == TEXT and summary["frames"] == len(frames)
    log = out.with_suffix(".log").read_text()
    assert f"speech: {len(TEXT)} characters of text spoken by the espeak engine (voice default)" in log


@requires_golden
@requires_espeak
def test_the_video_length_follows_the_text(tmp_path, monkeypatch):
    """A longer text gives a longer job (without running the model: the job's speech and clip count)."""
    from liveavatar.engine import job as job_module
    from liveavatar.interfaces import cli

    seen = []

    def fake_run_job(pipe, spec, should_stop=None, **options):
        seen.append((spec, job_module.preflight(spec)))
        return iter(())

    monkeypatch.setattr("liveavatar.engine.job.run_job", fake_run_job)
    for text in ("Hello.", TEXT, " ".join([TEXT] * 4)):
        cli.main(["generate", "--image", str(FACE), "--text", text, "--save_dir", str(tmp_path), *CPU])
    lengths = [len(wave) for _, wave in seen]
    assert lengths[0] < lengths[1] < lengths[2] and lengths[2] == pytest.approx(4 * lengths[1], rel=0.15)
    assert [clips_covered(n) for n in lengths] == sorted(clips_covered(n) for n in lengths)
    # Named by the text's first words when --save_file is not given.
    assert seen[1][0].output == tmp_path / "face_Hello_there_I_am.mp4"


@requires_golden
@requires_espeak
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text", ""], "error: the text to speak is empty"),
        (["--text", "x" * 5001], "error: the text is 5001 characters long; the limit is 5000"),
        (["--text", "Hi.", "--voice", "xx-nowhere"], "error: unknown espeak voice 'xx-nowhere': pick a language like en-us"),
        (["--text", "Hi.", "--tts", "festival"], "error: unknown speech engine 'festival': pick one of espeak, piper"),
        (["--text", "Hi.", "--tts", "piper", "--voice", "xx_XX-none-low"],
         "error: Piper voice 'xx_XX-none-low' is not downloaded: run `liveavatar download --tts piper --voice xx_XX-none-low`"),
        (["--text", "Hi.", "--audio", str(REPO / "examples" / "speech.wav")], "error: --audio and --text: give one of them"),
        ([], "error: no speech: give --audio FILE (a recording) or --text 'words to speak'"),
        (["--audio", str(REPO / "examples" / "speech.wav"), "--voice", "de"], "error: --voice: only used with --text"),
        (["--enable_tts"], "error: --enable_tts: give the words to speak with --text"),
        (["--text", "Hi.", "--tts_prompt_audio", "me.wav"], "error: --tts_prompt_audio: refused, cloning a voice from a prompt"),
        (["--tts_text", "Hi.", "--text", "Hi."], "error: --tts_text and --text: give the text once"),
    ],
)
def test_text_errors_are_one_line(tmp_path, capsys, monkeypatch, extra, message):
    if "piper" in extra:
        monkeypatch.setenv("LIVEAVATAR_VOICES", str(tmp_path / "voices"))
        if not tts._engine_class("piper").available():
            message = "error: speech engine 'piper' is not installed: pip install 'liveavatar[tts]'"
    out = tmp_path / "o.mp4"
    assert main(["generate", "--image", str(FACE), "--save_file", str(out), *CPU, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message), err
    assert not out.exists() and not speech_file_for(out).exists()


@requires_golden
@requires_espeak
def test_original_tts_flags_map_onto_text(tmp_path, capsys, monkeypatch):
    from liveavatar.interfaces import cli

    seen = {}

    def fake_run_job(pipe, spec, should_stop=None, **options):
        seen.update(text=spec.text, audio=spec.audio, exists=Path(spec.audio).is_file())
        return iter(())

    monkeypatch.setattr("liveavatar.engine.job.run_job", fake_run_job)
    out = tmp_path / "o.mp4"
    cli.main(["generate", "--image", str(FACE), "--enable_tts", "--tts_text", "Hello from the original flags.",
              "--save_file", str(out), *CPU])
    err = capsys.readouterr().err
    assert "--tts_text: accepted as --text" in err
    assert "--enable_tts: accepted; the text is spoken by the espeak engine (--tts)" in err
    assert seen == {"text": "Hello from the original flags.", "audio": speech_file_for(out), "exists": True}


@requires_espeak
def test_a_resumed_text_job_reuses_its_speech(tmp_path):
    spec = JobSpec(image=FACE, audio=tmp_path / "o.speech.wav", prompt="p", output=tmp_path / "o.mp4", text="Hello.")
    synthesize_text(spec)
    first = spec.audio.read_bytes()
    spec.audio.write_bytes(first[:-100])  # as if a neural voice had said it a little differently
    synthesize_text(spec, reuse=True)
    assert spec.audio.read_bytes() == first[:-100], "kept: the resumed run speaks what the first one spoke"
    synthesize_text(spec)
    assert spec.audio.read_bytes() == first
    # The resume state's fingerprint holds the text: another text never resumes this run's state.
    other = JobSpec(**{**spec.__dict__, "text": "Goodbye."})
    assert spec.fingerprint() != other.fingerprint()


# ------------------------------------------------------------------------------------ Piper (stand-in voice)

@requires_piper
def test_piper_speaks_with_a_voice_file_and_a_voice_name(tmp_path, monkeypatch, fresh_engines):
    from piper import PiperVoice

    monkeypatch.setenv("LIVEAVATAR_VOICES", str(tmp_path / "voices"))
    path = make_standin_voice(tmp_path / "voices" / "xx" / "xx_XX" / "standin" / "low")
    engine = tts.get_engine("piper")
    assert engine.voices() == ["xx_XX-standin-low"]
    assert engine.check_voice("xx_XX-standin-low") == str(path)
    assert engine.check_voice(str(path)) == str(path.resolve())
    speech = tts.synthesize(TEXT, "piper", "xx_XX-standin-low")
    voice = PiperVoice.load(path)
    ids = sum(len(voice.phonemes_to_ids(p)) for p in voice.phonemize(TEXT))
    assert speech.sample_rate == 22050 and len(speech.samples) == ids * 1024, "one tone per phoneme id, all of them"
    with pytest.raises(tts.TTSError, match="missing.onnx: Piper voice file not found"):
        engine.check_voice(str(tmp_path / "missing.onnx"))
    with pytest.raises(tts.TTSError, match=r"'en_US-lessac-medium' is not downloaded \(downloaded: xx_XX-standin-low\)"):
        engine.check_voice(None)
    with pytest.raises(tts.TTSError, match="'lessac' is not a Piper voice name"):
        engine.check_voice("lessac")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    Path(f"{broken}.json").write_text(Path(f"{path}.json").read_text())
    with pytest.raises(tts.TTSError, match="broken.onnx: not a usable Piper voice"):
        tts.synthesize("Hi.", "piper", str(broken))


@requires_golden
@requires_piper
def test_generate_text_with_piper(tmp_path, capsys):
    voice = make_standin_voice(tmp_path / "voice")
    out = tmp_path / "piper.mp4"
    text = "Hello there. How are you?"
    assert main(["generate", "--image", str(FACE), "--text", text, "--tts", "piper", "--voice", str(voice),
                 "--save_file", str(out), *CPU]) == 0
    speech = to_speech_rate(tts.synthesize(text, "piper", str(voice)))
    frames, *_ = read_video(out)
    assert len(frames) == -(-len(speech) // 640)  # the video ends with the speech
    sound = load_audio(out)  # the whole speech, from its first sample
    assert abs(len(sound) - len(speech)) < 0.05 * 16000
    assert _audio_correlation(sound, speech) > 0.9


class FakeHub:
    """Stands in for huggingface_hub: 'downloads' a stand-in voice into local_dir, as hf_hub_download would."""

    def __init__(self, source: Path):
        self.source, self.calls = source, []

    def hf_hub_download(self, repo, filename, local_dir=None):
        self.calls.append((repo, filename))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        name = Path(filename).name
        if not (self.source / name).exists():
            raise FileNotFoundError(f"404: {filename}")
        shutil.copy(self.source / name, target)
        return str(target)


@requires_piper
def test_download_a_piper_voice(tmp_path, monkeypatch, capsys, fresh_engines):
    from liveavatar.weights import hub

    make_standin_voice(tmp_path / "hub", name="en_US-lessac-medium")
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "_hub", lambda: fake)
    monkeypatch.setenv("LIVEAVATAR_VOICES", str(tmp_path / "voices"))
    assert main(["download", "--tts", "piper", "--voice", "en_US-lessac-medium"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "voices" / "en" / "en_US" / "lessac" / "medium" / "en_US-lessac-medium.onnx"
    assert fake.calls == [("rhasspy/piper-voices", "en/en_US/lessac/medium/en_US-lessac-medium.onnx.json"),
                          ("rhasspy/piper-voices", "en/en_US/lessac/medium/en_US-lessac-medium.onnx")]
    assert main(["voices", "--tts", "piper"]) == 0
    assert capsys.readouterr().out.split() == ["en_US-lessac-medium"]
    assert tts.synthesize("Hello.", "piper").sample_rate == 22050  # the default voice, now downloaded

    assert main(["download", "--tts", "piper", "--voice", "de_DE-nobody-low"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: cannot download de/de_DE/nobody/low/de_DE-nobody-low.onnx.json from rhasspy/piper-voices")
    assert main(["download", "--tts", "espeak"]) == 2
    assert "its voices come with the engine" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the live speaker

class FakeSession:
    def __init__(self, room_s: float = 1e9):
        self.pushed, self.times, self.room = [], [], int(room_s * 16000)

    def push(self, samples):
        from liveavatar.engine.live import SpeechQueueFull

        if sum(map(len, self.pushed)) + len(samples) > self.room:
            raise SpeechQueueFull("full")
        self.pushed.append(np.asarray(samples))
        self.times.append(time.perf_counter())
        return sum(map(len, self.pushed[:-1]))


class SlowEngine(tts.Engine):
    """Half a second of tone per sentence, after `delay` seconds of 'synthesis'; records when each started."""

    name, delay = "slow", 0.4
    started: list = []

    @classmethod
    def available(cls):
        return True

    def check_voice(self, voice):
        if voice not in (None, "tone"):
            raise tts.TTSError(f"unknown slow voice {voice!r}")
        return "tone"

    def synthesize(self, text, voice):
        self.started.append((text, time.perf_counter()))
        time.sleep(self.delay)
        return tts.Speech(np.full(11025, 0.25, np.float32), 22050)


def test_speaker_starts_the_first_sentence_before_the_rest_is_synthesised(fresh_engines):
    tts.register_engine("slow", SlowEngine)
    SlowEngine.started = []
    session, events = FakeSession(), []
    speaker = TextSpeaker(session, engine="slow", on_event=events.append)
    sentences = speaker.say("One. Two! Three? Four.")
    assert sentences == ["One.", "Two!", "Three?", "Four."]
    for _ in range(100):
        if len(events) == 4:
            break
        time.sleep(0.05)
    assert [e["text"] for e in events] == sentences and all(e["type"] == "speech" for e in events)
    # The first sentence was in the session's queue before the last one had even started to be synthesised.
    assert session.times[0] < SlowEngine.started[-1][1]
    assert [e["speech_start"] for e in events] == [0, 8000, 16000, 24000]
    assert all(e["speech_samples"] == 8000 for e in events)  # half a second at 16 kHz
    with pytest.raises(tts.TTSError, match="unknown slow voice"):
        speaker.say("Hi.", voice="bass")
    with pytest.raises(tts.TTSError, match="empty"):
        speaker.say(" ")
    speaker.close()
    speaker.join(5)


def test_speaker_waits_for_room_in_a_full_queue(fresh_engines):
    tts.register_engine("slow", SlowEngine)
    SlowEngine.delay = 0.0
    try:
        session = FakeSession(room_s=1.2)
        speaker = TextSpeaker(session, engine="slow")
        speaker.say("One. Two. Three.")
        time.sleep(0.5)
        assert sum(map(len, session.pushed)) == 16000  # two sentences fit, the third waits
        session.room = 10**9  # the session spoke some: room again
        for _ in range(100):
            if speaker.sentences_spoken == 3:
                break
            time.sleep(0.05)
        assert sum(map(len, session.pushed)) == 24000
        speaker.close()
        speaker.join(5)
    finally:
        SlowEngine.delay = 0.4
