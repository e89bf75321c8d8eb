"""`liveavatar app`: the web UI (Gradio). The video plays in the page from its first block and grows while
the rest is generated; the finished MP4 can be downloaded.

Each generated block is written as a small MP4 (H.264 + AAC, the block's frames with their speech) and
handed to Gradio's streaming video output, which plays the chunks back to back (HLS in the page). The job
itself runs through `run_job` on the engine thread, as with `liveavatar generate`, and writes the full MP4.
Every request uses the one model loaded at start; requests queue, and Cancel stops a job after its block.
"""

from __future__ import annotations

import os
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

import gradio as gr

from liveavatar import tts
from liveavatar.engine.job import SAMPLE_RATE, JobResult, JobSpec, Progress, read_speech, synthesize_text
from liveavatar.engine.multi_person import Speakers
from liveavatar.engine.worker import EngineWorker, JobTask, QueueFull, TaskState
from liveavatar.errors import InputError
from liveavatar.media import image as image_io
from liveavatar.media.video import PARTIAL_SUFFIX, FragmentedMP4Writer, open_sound


REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [[str(REPO / "examples" / "face.png"), str(REPO / "examples" / "speech.wav"),
             "A cartoon person talks to the camera in a bright studio."]]
# System fonts: the default theme would make every browser fetch its fonts from a font CDN.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class ChunkSound:
    """The job's sound track (its speech at the file's own rate and channels, or several people's mixed speech,
    as in the job's MP4), read block by block in order: output frame j shows the track at j / fps."""

    def __init__(self, spec: JobSpec):
        self.reader = open_sound(read_speech(spec).track, SAMPLE_RATE)
        self.fps = spec.fps
        self.position = 0  # samples read so far

    def for_frames(self, first_frame: int, count: int):
        rate = self.reader.sample_rate
        start, stop = first_frame * rate // self.fps, (first_frame + count) * rate // self.fps
        if start > self.position:  # a block was skipped: its sound too
            self.reader.read(start - self.position)
            self.position = start
        sound = self.reader.read(stop - self.position)
        self.position += sound.shape[1]
        return sound

    def close(self) -> None:
        self.reader.close()


def write_chunk(path: Path, progress: Progress, sound: ChunkSound, fps: int = 25) -> None:
    """One block as a standalone MP4 with the speech its frames show."""
    frames = progress.block.frames.numpy()
    samples = sound.for_frames(progress.block.first_frame, len(frames))
    writer = FragmentedMP4Writer(path, frames.shape[2], frames.shape[1], fps, samples if samples.shape[1] else None,
                                 sound.reader.sample_rate)
    writer.write(frames)
    writer.close()


def _status(progress: Progress) -> str:
    fps = progress.frames_done / progress.elapsed_s if progress.elapsed_s else 0.0
    notes = "".join(f"\n\nNote: {notice}" for notice in progress.notices)
    return (f"Generating: block {progress.blocks_done} of {progress.blocks_total}, frame {progress.frames_done} of "
            f"{progress.frames_total}, {progress.elapsed_s:.1f} s ({fps:.1f} frames/s){notes}")


def _voices(engine: str | None) -> list[str]:
    """The voices of an engine for the page's list (none when it is not installed)."""
    try:
        return tts.get_engine(engine).voices()
    except tts.TTSError:
        return []


def build_app(worker: EngineWorker, work_dir: Path, default_size: str = "704*384", max_audio_s: float = 600,
              realtime=None) -> gr.Blocks:
    """realtime: a liveavatar.engine.realtime.Realtime: the page shows the measured speeds and, if it is the
    default (`app --realtime`), each page opens with the real-time preset's size and step count."""
    work_dir = Path(work_dir).resolve()
    sizes = list(image_io.SIZE_PRESETS) + ([default_size] if default_size not in image_io.SIZE_PRESETS else [])

    def generate(image, audio, prompt, size, num_clip, sample_steps, seed, trim_silence, normalize_loudness,
                 text="", tts_engine=None, voice=None, audio2=None, mask1=None, mask2=None):
        text = text if text and text.strip() else None
        if not image:
            raise gr.Error("Add a reference image (upload one or take it with the webcam).")
        if not audio and text is None:
            raise gr.Error("Add speech (upload a file or record it with the microphone), or type a text to speak.")
        if audio and text is not None:
            raise gr.Error("Give either speech or a text to speak, not both (clear one of them).")
        try:
            image_io.parse_size(size)
        except InputError as e:
            raise gr.Error(f"Size: {e}") from None
        if audio2 and text is not None:
            raise gr.Error("Two people need a speech file each (a text speaks for one person): clear the text.")
        if (mask1 or mask2) and not audio2:
            raise gr.Error("Add the second person's speech, or remove the masks (they are for two people).")
        if audio2 and bool(mask1) != bool(mask2):
            raise gr.Error("Add a mask for each person, or none (the people are then found by their faces).")
        folder = work_dir / "jobs" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        # The inputs are copied next to the output: the job and its files stay together.
        image_path = folder / ("image" + Path(image).suffix)
        audio_path = folder / ("audio" + Path(audio).suffix if text is None else "speech.wav")
        shutil.copyfile(image, image_path)
        if text is None:
            shutil.copyfile(audio, audio_path)
        names = {image_path: Path(image).name, audio_path: Path(audio).name if text is None else "the synthesised speech"}
        speakers = None
        if audio2:  # two people in the picture: each speech drives its person (masks: white = that person)
            people = [audio_path]
            for i, given in enumerate([audio2] + ([mask1, mask2] if mask1 else [])):
                kind = "audio" if i == 0 else "mask"
                path = folder / (f"{kind}{2 if i == 0 else i}" + Path(given).suffix)
                shutil.copyfile(given, path)
                names[path] = Path(given).name
                people.append(path)
            speakers = Speakers(tuple(people[:2]), tuple(people[2:]) or None)
        spec = JobSpec(image=image_path, audio=audio_path, prompt=prompt or "A person is talking.", output=folder / "output.mp4",
                       size=size, num_clip=int(num_clip) if num_clip else None, sample_steps=int(sample_steps),
                       seed=int(seed), trim_silence=trim_silence, normalize_loudness=normalize_loudness,
                       max_audio_s=max_audio_s, text=text, voice=voice or None, tts=tts_engine or None, speakers=speakers)
        try:
            synthesize_text(spec)  # a text's speech, made before the job is queued (its errors are named at once)
        except InputError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise gr.Error(f"Text to speech: {e}") from None
        try:
            task = worker.submit(JobTask(kind="job", spec=spec))
        except QueueFull as e:
            raise gr.Error(str(e)) from None
        events = task.subscribe()
        sound = None
        try:
            yield gr.skip(), "Preparing the image, the prompt and the speech…", None, task.id
            result = None
            while (item := events.get()) is not None:
                if isinstance(item, JobResult):
                    result = item
                    continue
                if sound is None:  # the job's sound track, from its first shown frame on
                    sound = ChunkSound(spec)
                chunk = folder / f"block-{item.block.index:06d}.mp4"
                write_chunk(chunk, item, sound, spec.fps)
                # Gradio has turned a chunk into its stream segment before it asks for the next one, so only
                # the newest chunks are kept: a long video does not leave thousands of them behind.
                (folder / f"block-{item.block.index - 2:06d}.mp4").unlink(missing_ok=True)
                yield str(chunk), _status(item), None, task.id
            if task.state == TaskState.CANCELLED:
                partial = Path(str(spec.output) + PARTIAL_SUFFIX)
                yield gr.skip(), "Cancelled: the video generated so far can be downloaded.", \
                    str(partial) if partial.exists() else None, None
            elif task.state != TaskState.DONE:  # named by the user's file names, not the job folder's
                error = task.error
                for path in sorted(names, key=lambda p: -len(str(p))):  # audio2.wav before audio.wav
                    error = error.replace(str(path), names[path])
                raise gr.Error(f"Generation failed: {error}")
            else:
                yield gr.skip(), (f"Done: {result.frames} frames ({result.width}x{result.height}) in {result.seconds:.1f} s, "
                                  f"first block after {task.first_block_s:.1f} s."), str(result.output), None
        finally:
            if sound is not None:
                sound.close()
            if not task.state.finished:  # the page went away or the event was cancelled
                worker.cancel(task)

    def cancel(task_id):
        task = worker.tasks.get(task_id) if task_id else None
        if task is not None:
            worker.cancel(task)

    with gr.Blocks(title="liveavatar", analytics_enabled=False) as demo:
        gr.Markdown("## liveavatar\nA reference image, speech (or a text to speak) and a prompt make a talking-avatar "
                    "video. It starts playing after the first block and keeps growing while the rest is generated.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Reference image", sources=["upload", "webcam", "clipboard"], type="filepath",
                                 elem_id="image")
                audio = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath", elem_id="audio")
                text = gr.Textbox(label=f"…or text to speak (instead of speech; at most {tts.MAX_TEXT_CHARS} characters)",
                                  lines=3, max_length=tts.MAX_TEXT_CHARS, elem_id="text",
                                  placeholder="Hello! I read what you type.")
                with gr.Accordion("Voice of the text", open=False):
                    engines = tts.available_engines() or [tts.DEFAULT_ENGINE]
                    tts_engine = gr.Dropdown(engines, value=tts.DEFAULT_ENGINE if tts.DEFAULT_ENGINE in engines else engines[0],
                                             label="Speech engine", elem_id="tts")
                    voice = gr.Dropdown(_voices(tts_engine.value), value=None, allow_custom_value=True, elem_id="voice",
                                        label="Voice (empty: the engine's default; for piper also a voice .onnx path)")
                    tts_engine.change(lambda name: gr.update(choices=_voices(name), value=None), [tts_engine], [voice])
                prompt = gr.Textbox(label="Prompt", value="A person is talking.", elem_id="prompt")
                with gr.Accordion("Two people in the picture", open=False):
                    gr.Markdown("The speech above is the first person's (the left one when the people are found by "
                                "their faces); each speech moves only its person. The video lasts as long as the "
                                "shorter speech, and its sound is the two mixed.")
                    audio2 = gr.Audio(label="Second person's speech", sources=["upload", "microphone"], type="filepath",
                                      elem_id="audio2")
                    with gr.Row():
                        mask1 = gr.Image(label="Mask of the first person (optional: white = that person, the "
                                         "image's size)", sources=["upload", "clipboard"], type="filepath",
                                         image_mode="L", format="png", elem_id="mask1")
                        mask2 = gr.Image(label="Mask of the second person", sources=["upload", "clipboard"],
                                         type="filepath", image_mode="L", format="png", elem_id="mask2")
                with gr.Accordion("Options", open=False):
                    size = gr.Dropdown(sizes, value=default_size, allow_custom_value=True, elem_id="size",
                                       label="Size: pixel budget W*H (the aspect ratio follows the image)")
                    num_clip = gr.Number(0, precision=0, minimum=0, label="Clips of 48 frames (0: as many as the speech covers)")
                    fixed_steps = worker.pipe.fixed_sample_steps  # a multi-GPU pipeline runs one step count
                    sample_steps = gr.Slider(1, 8, value=fixed_steps or 4, step=1, interactive=fixed_steps is None,
                                             label="Denoising steps (the model is distilled for 4)")
                    seed = gr.Number(42, precision=0, label="Seed (the same seed gives the same video)")
                    trim_silence = gr.Checkbox(False, label="Trim leading and trailing silence")
                    normalize_loudness = gr.Checkbox(False, label="Normalise loudness (EBU R128, -23 LUFS)")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", elem_id="cancel")
            with gr.Column():
                video = gr.Video(label="Video", streaming=True, autoplay=True, elem_id="video")
                status = gr.Markdown(elem_id="status")
                download = gr.File(label="MP4 to download", elem_id="download")
                speeds = gr.Markdown(elem_id="speeds", visible=realtime is not None)
        if all(Path(path).exists() for path in EXAMPLES[0][:2]):  # a source checkout ships them
            gr.Examples(EXAMPLES, inputs=[image, audio, prompt])
        task_id = gr.State(None)
        event = run.click(generate, [image, audio, prompt, size, num_clip, sample_steps, seed, trim_silence, normalize_loudness,
                                     text, tts_engine, voice, audio2, mask1, mask2],
                          [video, status, download, task_id], concurrency_limit=1, show_progress="minimal")
        stop.click(cancel, [task_id], None, cancels=[event])
        if realtime is not None:
            demo.load(lambda: _realtime_view(realtime), None, [speeds, size, sample_steps])
    return demo


def _realtime_view(realtime) -> tuple:
    """The measured speeds, and with `--realtime` the preset's size and steps for the form (as measured now: the
    start-up calibration may still be running when a page opens)."""
    from liveavatar.engine.realtime import describe_speeds

    choice = realtime.choice()
    if realtime.default and choice.size is not None:
        return describe_speeds(realtime), gr.update(value=choice.size), gr.update(value=choice.steps)
    return describe_speeds(realtime), gr.skip(), gr.skip()


def main(args) -> int:
    from liveavatar.interfaces.backend import Backend, open_realtime

    # Gradio reads this when it would send usage statistics: none leave the machine (the Blocks' own
    # analytics_enabled=False also skips its version check).
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="liveavatar-app-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    pipe = Backend.from_args(args).open()
    worker = EngineWorker(pipe, max_queue=args.max_queue)
    realtime = open_realtime(args, pipe, worker)
    try:
        build_app(worker, work_dir, args.size, args.max_audio_s, realtime).queue(max_size=args.max_queue).launch(
            server_name=args.server_name, server_port=args.server_port, allowed_paths=[str(work_dir)], share=False,
            theme=THEME,
        )
    finally:
        worker.shutdown()
        pipe.close()
    return 0
