"""Real-time presets (the chooser on given speed tables, session plans, stepping down, the speed table file) and
the live speech queue's lag and catch-up, with a clock the test moves (no model, no waiting)."""

import json

import numpy as np
import pytest

from liveavatar.engine import realtime as rt
from liveavatar.engine.live import JITTER_S, KEEP_PAUSE_S, LiveSpeech, silent_frames
from liveavatar.engine.realtime import BlockMeter, SpeedTable, choose, next_rung, plan_session, preference_order

# What one H100 might measure (FPS): only 384*256 keeps up (27.5 FPS needed).
H100 = {("704*384", 4): 13.2, ("704*384", 3): 16.9, ("688*368", 4): 14.1, ("688*368", 3): 18.0,
        ("384*256", 4): 31.0, ("384*256", 3): 38.5}


def test_preference_order_is_largest_size_then_4_then_3_steps():
    assert preference_order(["384*256", "704x384", "688*368"], [4, 3]) == [
        ("704*384", 4), ("704*384", 3), ("688*368", 4), ("688*368", 3), ("384*256", 4), ("384*256", 3)]


@pytest.mark.parametrize("changes, picked", [
    ({}, ("384*256", 4)),  # the only size that keeps up, at 4 steps
    ({("688*368", 3): 28.0}, ("688*368", 3)),  # a larger size at 3 steps beats a smaller one at 4
    ({("704*384", 3): 27.5, ("688*368", 4): 30.0}, ("704*384", 3)),  # the largest size first; 27.5 is exactly 1.1x
    ({("704*384", 4): 27.6}, ("704*384", 4)),  # at a size that keeps up at both, 4 steps
    ({("384*256", 4): 27.4}, ("384*256", 3)),  # just short of 1.1x: fewer steps
])
def test_chooser_picks_the_largest_size_then_the_most_steps_that_keep_up(changes, picked):
    choice = choose({**H100, **changes})
    assert (choice.size, choice.steps) == picked and choice.keeps_up and choice.needed_fps == pytest.approx(27.5)
    assert choice.fps == {**H100, **changes}[picked]
    assert choice.reason.startswith(f"{picked[0]} at {picked[1]} steps: ")
    assert [(c["size"], c["sample_steps"]) for c in choice.considered] == preference_order(rt.CANDIDATE_SIZES, (4, 3))


def test_chooser_says_why_when_nothing_keeps_up_or_nothing_is_measured():
    slow = {k: v / 3 for k, v in H100.items()}
    choice = choose(slow)
    assert (choice.size, choice.steps, choice.keeps_up) == ("384*256", 3, False)  # the fastest, flagged
    assert "no candidate keeps up" in choice.reason and "704*384 at 4 steps: 4.4 FPS (0.18x real time)" in choice.reason
    partial = choose({("384*256", 3): 40.0})
    assert (partial.size, partial.steps) == ("384*256", 3)
    assert "704*384 at 4 steps: not measured" in partial.reason
    empty = choose({})
    assert empty.size is None and not empty.keeps_up and empty.reason.startswith("nothing measured yet")
    # Other candidates and another frame rate or margin.
    assert choose({("128*128", 4): 30.0, ("64*64", 4): 60.0}, ["128*128", "64*64"], [4]).size == "128*128"
    assert choose({("128*128", 4): 30.0, ("64*64", 4): 60.0}, ["128*128", "64*64"], [4], factor=1.5).size == "64*64"
    assert choose({("128*128", 4): 30.0}, ["128*128"], [4], video_fps=30).keeps_up is False


def test_session_plans_follow_the_request_and_its_policy():
    auto = plan_session(H100, "auto", 4, False, "downgrade")
    assert (auto.size, auto.steps, auto.refused) == ("384*256", 4, None) and auto.message["type"] == "realtime"
    assert plan_session(H100, "704*384", 4, True, "refuse").size == "384*256"  # realtime overrides the size
    later = plan_session({}, None, 4, True, "downgrade")
    assert later.size is None and later.refused is None and "picked when the session starts" in later.message["reason"]

    refused = plan_session(H100, "704*384", 4, False, "refuse")
    assert refused.size is None and refused.refused == (
        "704*384 at 4 steps makes 13.2 FPS on this machine, below the 27.5 FPS a live session needs to keep up "
        "(1.1x 25 FPS); the real-time preset here is 384*256 at 4 steps (31.0 FPS): ask for it, or for on_slow=downgrade")
    down = plan_session(H100, "704x384", 4, False, "downgrade")
    assert (down.size, down.steps, down.refused) == ("384*256", 4, None)
    assert down.message["type"] == "downgrade" and down.message["requested"] == {"size": "704*384", "sample_steps": 4, "fps": 13.2}
    assert "downgraded to 384*256 at 4 steps (31.0 FPS)" in down.message["reason"]
    kept = plan_session(H100, "704*384", 4, False, "keep")
    assert (kept.size, kept.steps, kept.message) == ("704*384", 4, None)
    fine = plan_session(H100, "384*256", 3, False, "refuse")
    assert (fine.size, fine.steps, fine.message) == ("384*256", 3, None)
    unmeasured = plan_session(H100, "720*400", 4, False, "refuse")  # not measured: it runs (its lag will tell)
    assert (unmeasured.size, unmeasured.refused) == ("720*400", None)
    nothing_faster = plan_session({("704*384", 4): 13.2}, "704*384", 4, False, "downgrade")
    assert (nothing_faster.size, nothing_faster.steps) == ("704*384", 4)
    assert "nothing measured is faster" in nothing_faster.message["reason"]
    assert "no measured size keeps up here" in plan_session({("704*384", 4): 13.2}, "704*384", 4, False, "refuse").refused
    with pytest.raises(ValueError):
        plan_session(H100, "704*384", 4, False, "hurry")


def test_step_down_goes_to_what_keeps_up_else_to_the_next_cheaper():
    assert next_rung(H100, "704*384", 4) == ("384*256", 4)  # straight to what is measured to keep up
    assert next_rung({}, "704*384", 4) == ("704*384", 3)  # nothing measured: the next cheaper candidate
    assert next_rung({}, "704*384", 3) == ("688*368", 3)  # 688*368 at 4 steps costs more than 704*384 at 3
    assert next_rung({("704*384", 3): 10.0, ("688*368", 3): 9.0, ("384*256", 4): 20.0}, "704*384", 3) == ("384*256", 4)
    assert next_rung(H100, "384*256", 3) is None  # the cheapest
    assert next_rung({}, "720*400", 4) == ("704*384", 4)  # a size that is no candidate
    only_warm = lambda size, steps: size == "704*384"  # noqa: E731
    assert next_rung(H100, "704*384", 4, allowed=only_warm) == ("704*384", 3)
    assert next_rung({}, "128*128", 4, ["128*128", "64*64"], [4]) == ("64*64", 4)


def test_block_meter_counts_steady_intervals_that_did_not_wait():
    meter = BlockMeter(steady_from=2)
    for index, t in enumerate([0.0, 1.0, 2.0, 2.5, 3.0]):
        meter.block(index, 12, now=t)
    assert meter.fps is None  # two steady intervals (blocks 3 and 4): fewer than MIN_INTERVALS
    meter.block(5, 12, waited_s=0.3, now=3.8)  # paced by the speaker: not the machine's speed
    meter.block(6, 12, now=4.3)
    assert meter.intervals == 3 and meter.fps == pytest.approx(36 / 1.5)
    meter.block(9, 12, now=5.0)  # not the next block: no interval
    assert meter.intervals == 3


def test_speed_table_persists_per_machine_and_prefers_live_measurements(tmp_path):
    path = tmp_path / "cache" / "speed.json"
    h100 = SpeedTable(path, "NVIDIA H100 80GB HBM3 | bfloat16 fp8 compiled")
    h100.record("704x384", 4, 13.2, 7, "calibration")
    cpu = SpeedTable(path, "cpu x86_64 (2 threads) | float32")
    cpu.record("128*128", 4, 20.0, 5, "job")
    cpu.record("128*128", 4, 30.0, 5, "session")  # a session's measurement replaces a job's
    cpu.record("128*128", 4, 50.0, 5, "job")  # and a job's no longer changes it
    again = SpeedTable(path, "NVIDIA H100 80GB HBM3 | bfloat16 fp8 compiled")
    assert again.speeds() == {("704*384", 4): 13.2}
    again.record("704*384", 4, 14.0, 24, "session")  # merged: earlier blocks weigh at most HISTORY_WEIGHT
    assert again.speeds()[("704*384", 4)] == pytest.approx((13.2 * 7 + 14.0 * 24) / 31, abs=1e-3)
    again.record("704*384", 4, 12.0, 7, "calibration")  # a calibration replaces
    assert again.speeds()[("704*384", 4)] == 12.0
    data = json.loads(path.read_text())
    assert data["version"] == 1 and set(data["machines"]) == {h100.machine, cpu.machine}
    entry = data["machines"][cpu.machine]["128*128"]["4"]
    assert (entry["fps"], entry["source"], entry["job_fps"]) == (30.0, "session", 50.0)
    assert again.entries()[0]["size"] == "704*384" and {"updated", "blocks"} <= set(again.entries()[0])
    path.write_text("{not json")
    assert SpeedTable(path, "x").speeds() == {}  # a broken file starts an empty table
    assert SpeedTable(None, "x").record("64*64", 4, 60.0, 3, "session")["fps"] == 60.0  # in memory only


def test_realtime_service_summary_and_capabilities(tmp_path):
    service = rt.Realtime(SpeedTable(tmp_path / "t.json", "gpu | bf16"), fixed_steps=4)
    for (size, steps), fps in H100.items():
        service.table.record(size, steps, fps, 5, "calibration")
    assert service.steps == (4,)  # a multi-GPU pipeline runs one step count
    assert service.summary() == {"size": "384*256", "sample_steps": 4, "fps": 31.0, "keeps_up": True, "calibration": "off"}
    caps = service.capabilities()
    assert caps["needed_fps"] == 27.5 and caps["realtime"]["size"] == "384*256"
    assert [(r["size"], r["sample_steps"], r["keeps_up"]) for r in caps["speeds"]][:2] == [("704*384", 4, False), ("704*384", 3, False)]
    assert "384*256 at 4 steps" in rt.describe_speeds(service)
    meter = BlockMeter(steady_from=0)
    for i in range(5):
        meter.block(i, 12, now=i * 0.5)
    assert service.record("128*128", 4, meter, "session")["fps"] == pytest.approx(24.0)
    assert service.record("128*128", 4, BlockMeter(), "session") is None  # nothing measured: nothing recorded


def test_default_table_path_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIVEAVATAR_SPEED_TABLE", str(tmp_path / "mine.json"))
    assert rt.default_table_path() == tmp_path / "mine.json"
    monkeypatch.delenv("LIVEAVATAR_SPEED_TABLE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rt.default_table_path() == tmp_path / "liveavatar" / "speed.json"


# ------------------------------------------------------------------------------------------- the speech queue
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


SR, W = 16000, 7680  # samples per second and per window (12 frames)


def tone(seconds, level=0.3):
    t = np.arange(int(seconds * SR)) / SR
    return (level * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_lag_counts_from_the_oldest_speech_not_yet_out():
    clock = Clock()
    speech = LiveSpeech(None, lead_in_frames=0, clock=clock)
    assert speech.lag() == 0.0
    for i in range(10):  # a microphone: 100 ms every 100 ms
        speech.push(tone(0.1))
        clock.t += 0.1
    assert speech.lag() == pytest.approx(1.0)  # the first sample was pushed 1 s ago and nothing is out
    window = speech._next_window(0, 12)
    assert (window.speech_start, window.speech_samples, window.speech_end, window.received_at) == (0, W, W, 100.0)
    speech.mark_produced(window.speech_end)
    assert speech.lag() == pytest.approx(0.52)  # the oldest waiting sample came with the push at 100.4 s
    for k in (1, 2):
        clock.t += 2.0  # late each time: the windows are taken whole or with what has come
        speech.mark_produced(speech._next_window(k, 12).speech_end)
    assert speech._produced == 16000 and speech.lag() == 0.0  # all of it is out

    # Speech pushed faster than real time (a text's sentence) is due at the pace it is spoken: no lag while the
    # avatar speaks it at that pace ...
    text = LiveSpeech(None, lead_in_frames=0, clock=clock)
    text.push(tone(3.0))
    for k in range(6):
        clock.t += 0.48
        text.mark_produced(text._next_window(k, 12).speech_end)
        assert text.lag() == pytest.approx(0.0, abs=1e-9)
    clock.t += 3.0  # ... and lag once it falls behind that pace
    assert text.lag() == pytest.approx(3.0)


def test_a_late_window_restarts_the_clock_so_the_next_one_is_whole():
    clock = Clock()
    speech = LiveSpeech(None, lead_in_frames=0, clock=clock)
    speech.push(tone(0.48))
    assert speech._next_window(0, 12).padded_samples == 0
    speech.push(tone(0.1))
    clock.t += 5.0  # the stream was busy: window 1's time is long past
    late = speech._next_window(1, 12)
    assert late.speech_samples == 1600 and late.padded_samples == W - 1600
    # Window 2 now ends a full window after window 1 was taken, not at its original time 1.44 s after the start.
    assert speech._deadline(2) == pytest.approx(clock.t + 0.48 + JITTER_S)
    assert not speech.ready(2)
    speech.push(tone(0.48))
    assert speech.ready(2)
    assert speech._next_window(2, 12).padded_samples == 0


def test_lead_silence_keeps_the_dropped_first_frames_silent():
    clock = Clock()
    speech = LiveSpeech(None, clock=clock)
    speech.push(tone(1.0))
    window = speech._next_window(0, 12, lead=3 * 640)
    assert window.speech_samples == W - 1920 and not window.samples[:1920].any()
    assert speech._next_window(1, 12).speech_start == W - 1920


def test_catching_up_drops_only_silence_and_accounts_for_every_sample():
    clock = Clock()
    speech = LiveSpeech(None, max_lag_s=1.0, clock=clock)
    pushed = np.concatenate([tone(0.6), np.zeros(int(1.5 * SR), np.float32), tone(0.7), np.zeros(int(0.9 * SR), np.float32),
                             tone(0.5)])
    for at in range(0, len(pushed), 1600):  # pushed in real time ...
        speech.push(pushed[at : at + 1600])
        clock.t += 0.1
    clock.t += 2.0  # ... while the stream was stuck: 2 s behind
    windows = []
    while speech._queued:
        window = speech._next_window(len(windows), 12)
        windows.append(window)
        speech.mark_produced(window.speech_end)
        clock.t += 0.7  # slower than real time
    # Spoken + dropped is everything pushed, in order, nothing twice.
    assert [w.speech_start for w in windows] == [0] + [w.speech_end for w in windows[:-1]]
    assert windows[-1].speech_end == len(pushed)
    assert sum(w.speech_samples + w.dropped_samples for w in windows) == len(pushed)
    dropped = [r for w in windows for r in w.dropped]
    assert dropped and speech.dropped_samples == sum(e - s for s, e in dropped)
    for start, end in dropped:  # only silence was dropped
        assert not pushed[start:end].any()
    spoken = np.concatenate([w.samples[w.padded_samples :] for w in windows])
    keep = np.ones(len(pushed), bool)
    for start, end in dropped:
        keep[start:end] = False
    np.testing.assert_array_equal(spoken, pushed[keep])
    assert keep[: int(0.6 * SR)].all() and keep[-int(0.5 * SR) :].all()  # the speech itself is all there
    # Each pause keeps at least KEEP_PAUSE_S.
    assert (~keep).sum() <= int((1.5 + 0.9 - 2 * KEEP_PAUSE_S) * SR)


def test_silent_frames():
    x = np.concatenate([np.zeros(640, np.float32), tone(0.04), np.full(100, 0.5, np.float32)])
    assert silent_frames(x).tolist() == [True, True, False, False]


def test_service_flags_open_the_table_and_queue_the_calibration(tmp_path):
    import types

    import torch

    from liveavatar.engine.calibration import CalibrationTask
    from liveavatar.errors import LiveAvatarError
    from liveavatar.interfaces import cli
    from liveavatar.interfaces.backend import open_realtime

    class Worker:
        realtime, submitted = None, []

        def submit(self, task):
            self.submitted.append(task)

    pipe = types.SimpleNamespace(device=torch.device("cpu"), fixed_sample_steps=None, fast=False)
    args = cli.build_parser().parse_args(["serve", "--realtime", "--speed_table", str(tmp_path / "s.json"),
                                          "--realtime_sizes", "128*128,64x64", "--realtime_steps", "4"])
    worker = Worker()
    realtime = open_realtime(args, pipe, worker)
    assert worker.realtime is realtime and realtime.default and realtime.sizes == ("128*128", "64*64")
    assert realtime.steps == (4,) and realtime.table.path == tmp_path / "s.json"
    assert [type(t) for t in worker.submitted] == [CalibrationTask] and realtime.calibration.state == "queued"
    assert not worker.submitted[0].redo
    worker.submitted.clear()
    plain = open_realtime(cli.build_parser().parse_args(["app"]), pipe, worker)  # no --realtime: no calibration
    assert not plain.default and worker.submitted == [] and plain.sizes == rt.CANDIDATE_SIZES
    again = open_realtime(cli.build_parser().parse_args(["serve", "--calibrate", "always"]), pipe, worker)
    assert worker.submitted[0].redo and not again.default
    with pytest.raises(LiveAvatarError, match="--realtime_sizes 'big'"):
        open_realtime(cli.build_parser().parse_args(["serve", "--realtime_sizes", "big"]), pipe, worker)
