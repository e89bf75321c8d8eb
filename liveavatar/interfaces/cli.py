"""`liveavatar` command line: generate, download.

Flags of the original `s2v_streaming_interact.py` scripts are accepted under their names (and with
hyphens). Flags whose effect is built in are accepted with a one-line notice; flags the original parses
but ignores are refused with an explanation, so a carried-over script never silently does less than it says.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

from liveavatar.errors import JobStopped, LiveAvatarError

DECODERS = ("wan", "taew2_1")  # liveavatar.models.taehv.DECODERS (not imported here: it loads torch)
TAEW_REPO = "madebyollin/taehv"

log = logging.getLogger("liveavatar")

EXAMPLE = "liveavatar generate --image examples/face.png --audio examples/speech.wav --prompt 'A person talking' --save_file out.mp4"
EXAMPLE_TEXT = "liveavatar generate --image examples/face.png --text 'Hello! I read what you type.' --save_file out.mp4"


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _add(parser, name: str, **kwargs):
    """Adds --snake_name and its --hyphen-name alias."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*names, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liveavatar",
        description="Real-time, unlimited-length talking-avatar video from one image, a speech track and a prompt "
        "(Wan2.2-S2V-14B + Live Avatar LoRA, 4-step block-causal streaming).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate a video (the main job)",
        description="Generate a lip-synced talking-avatar MP4. The video is written while it is generated "
        "(fragmented MP4: the partial file plays) and moved into place at the end.",
        epilog=f"examples:\n  {EXAMPLE}\n  {EXAMPLE_TEXT}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = gen.add_argument_group("inputs")
    _add(g, "image", required=True, type=Path, help="reference image (PNG, JPEG, WebP, ...)")
    _add(g, "audio", type=Path, help="speech: wav, mp3, flac, m4a, ogg, or a video's audio track; any rate and channels "
         "(or --text). Several people in the picture: one track per person joined with '+' (a.wav+b.wav), left to "
         "right unless --masks")
    _add(g, "masks", default=None, help="with several speech tracks: one mask image per track joined with '+' (a.png+b.png), "
         "the image's size, white = that person (default: the people are found by their faces, left to right; needs "
         "the multi extra)")
    _add_text_args(g)
    _add(g, "prompt", default="A person is talking.", help="text prompt describing the scene (default: %(default)r)")
    _add(g, "trim_silence", action="store_true", help="cut leading and trailing silence from the audio")
    _add(g, "normalize_loudness", action="store_true", help="normalise the speech to -23 LUFS (EBU R128)")

    o = gen.add_argument_group("output")
    _add(o, "save_file", type=Path, help="output MP4 (default: <save_dir>/<image name>_<audio name>.mp4)")
    _add(o, "save_dir", type=Path, default=Path("outputs"), help="folder for the default output name (default: %(default)s)")
    _add(o, "save_latents", type=Path, help="also write every latent frame to this safetensors file (key 'latents', float32 [16, T, h, w]; held in RAM)")
    _add(o, "resume", action="store_true", help="continue an interrupted run of the same command from its last completed clip")
    _add(o, "overwrite", action="store_true", help="start over: delete an interrupted run's partial video and resume "
         "states instead of refusing to run")

    s = gen.add_argument_group("generation")
    _add(s, "size", default="704*384", help="pixel budget W*H; the aspect ratio comes from the image. Presets: 720*400, 704*384, 688*368, 384*256 (default: %(default)s)")
    _add(s, "num_clip", type=int, default=None, help="clips of --infer_frames frames to generate (default: enough to cover the audio)")
    _add(s, "infer_frames", type=int, default=48, help="video frames per clip, a multiple of 12 (default: %(default)s)")
    _add(s, "sample_steps", type=int, default=4, help="denoising steps per block; the LoRA is distilled for 4 (default: %(default)s)")
    _add(s, "sink_frame", choices=["rolling", "reference"], default="rolling",
         help="identity anchor: 'rolling' (default, the real-time pipeline) makes the first generated frame the "
              "reference after clip 0; 'reference' keeps the input image for the whole video")
    _add(s, "base_seed", type=int, default=42, help="seed: the same seed gives the same video on any device (default: %(default)s)")
    _add(s, "original_timing", action="store_true",
         help="the original's exact timing (what the golden parity tests check): the model hears the speech from its "
              "first sample and the video starts 120 ms into it. By default 120 ms of silence go in front of the speech "
              "the model hears, so the video has the whole speech")

    _add_model_args(gen.add_argument_group("model and device"))

    compat = gen.add_argument_group("accepted for compatibility with the original scripts")
    for flag, kwargs in COMPAT_NOTICE.items():
        _add(compat, flag, default=None, nargs="?", const="True", help=kwargs)
    for flag, why in COMPAT_REFUSED.items():
        _add(compat, flag, default=None, help=f"refused unless default: {why}")
    _add(compat, "enable_tts", default=None, nargs="?", const="True", help="the original's switch to speak --tts_text: "
         "accepted, the text is spoken by --tts")
    _add(compat, "tts_text", default=None, help="the original's text to speak: accepted as --text")
    for flag in TTS_CLONING:
        _add(compat, flag, default=None, help=f"refused: {TTS_CLONING_WHY}")

    dl = sub.add_parser("download", help="download the weights (Wan2.2-S2V-14B and Live Avatar LoRA)",
                        description="Fetch both Hugging Face repos into a folder (resumable, with progress).")
    _add(dl, "ckpt_dir", type=Path, default=Path("ckpt"), help="destination folder (default: %(default)s)")
    _add(dl, "decoder", choices=DECODERS, default="wan", help="also fetch the light decoder's weights: 'taew2_1' "
         f"puts {TAEW_REPO}'s taew2_1.pth into <ckpt_dir>/taehv/, where --decoder taew2_1 finds it (default: %(default)s, "
         "nothing more)")
    _add(dl, "tts", default=None, help="instead of the weights, a voice for this speech engine (piper)")
    _add(dl, "voice", default=None, help="with --tts piper: the voice to fetch from rhasspy/piper-voices, e.g. "
         "en_US-lessac-medium (into $LIVEAVATAR_VOICES, default ~/.cache/liveavatar/voices)")

    voices = sub.add_parser("voices", help="list the speech engines (for --text) and their voices",
                            description="The text-to-speech engines this installation knows, whether each is installed, "
                            "and the voices of one engine (--tts).")
    _add(voices, "tts", default=None, help="list this engine's voices (default: list the engines)")

    app = sub.add_parser("app", help="web UI (Gradio): the video plays while it is generated",
                         description="A page to generate videos from an upload or webcam image and an uploaded or recorded "
                         "voice; requests queue on one model and can be cancelled.")
    _add_service_args(app, "size of the form's first view")
    _add(app, "server_name", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    _add(app, "server_port", type=int, default=7860, help="(default: %(default)s)")
    srv = sub.add_parser("serve", help="HTTP API (FastAPI): jobs, live MP4 output, live speech sessions, player page",
                         description="Job API with live output, live sessions that speak pushed speech, and a player page "
                         "at /player; the schema is at /openapi.json.")
    _add_service_args(srv, "default size of submitted jobs")
    _add(srv, "host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    _add(srv, "port", type=int, default=8000, help="(default: %(default)s)")
    _add(srv, "max_upload_mb", type=float, default=50, help="largest request body (image + audio) in MB (default: %(default)s)")
    return parser


def _add_text_args(parser) -> None:
    from liveavatar.tts import DEFAULT_ENGINE, MAX_TEXT_CHARS

    _add(parser, "text", default=None, help=f"words for the avatar to speak, instead of --audio: synthesised by --tts "
         f"with --voice, then used like a speech file (at most {MAX_TEXT_CHARS} characters)")
    _add(parser, "voice", default=None, help="with --text: the voice, e.g. en-us, de, fr-fr, en-us+f3 (espeak) or "
         "en_US-lessac-medium or a voice.onnx file (piper); `liveavatar voices --tts NAME` lists them "
         "(default: the engine's own)")
    _add(parser, "tts", default=None, help=f"with --text: the speech engine, espeak (built in) or piper (pip install "
         f"'liveavatar[tts]') (default: {DEFAULT_ENGINE})")


def _add_model_args(parser, gpus_note: str = "") -> None:
    """The flags that choose the weights, the device and the speed/memory modes (generate, app, serve)."""
    _add(parser, "ckpt_dir", type=Path, help="folder with Wan2.2-S2V-14B/ and LiveAvatar/ (default: the Hugging Face "
         "cache, downloaded on first use)")
    _add(parser, "lora_path_dmd", help="Live Avatar LoRA: a .safetensors file or a hub repo id (default: "
         "<ckpt_dir>/LiveAvatar/liveavatar.safetensors)")
    _add(parser, "device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    _add(parser, "dtype", default=None, choices=["bfloat16", "float16", "float32"],
         help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    _add(parser, "offload_model", type=_bool, nargs="?", const=True, default=False,
         help="low-memory mode for 16-48 GB GPUs (about 12 GiB needed at 704*384): the transformer's blocks and its FP8 "
              "key/value caches stay in pinned host memory and stream to the GPU layer by layer, except the blocks "
              "that fit in the GPU memory left after the first clip (True/False); the text and audio encoders leave "
              "the GPU after use either way")
    _add(parser, "fp8", action="store_true", help="FP8 (e4m3) linear layers in the transformer (GPUs with FP8 "
         "tensor cores: Ada, Hopper)")
    _add(parser, "decoder", choices=DECODERS, default="wan",
         help="what turns latents into frames: 'wan' (default) the Wan2.1 VAE's decoder, for final renders; "
              "'taew2_1' the tiny TAEW2.1 decoder (madebyollin/taehv), ~25x less arithmetic a block, for live, "
              "low-latency or smaller GPUs, at some cost in fine detail (the VAE still encodes the reference)")
    _add(parser, "decoder_path", default=None,
         help="the TAEW2.1 weights for --decoder taew2_1: taew2_1.pth or taew2_1.safetensors, a folder holding it, "
              f"or the hub id {TAEW_REPO} (default: <ckpt_dir>/taehv/, then the Hugging Face cache)")
    _add(parser, "gpus", type=int, default=1, help="GPUs to pipeline each block's work over: the denoising steps' "
         "layers are shared out so that every GPU has about the same work, the last one also decodes; any number "
         "up to one per layer of every step (cuda:0..N-1; choose them with CUDA_VISIBLE_DEVICES). With --device "
         f"cpu, that many CPU processes.{gpus_note} (default: %(default)s)")
    _add(parser, "log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _add_service_args(parser, size_help: str) -> None:
    """Model and queue options shared by `app` and `serve` (the model is loaded once, at start)."""
    _add_model_args(parser, " Requests then run 4 denoising steps, the distilled count.")
    _add(parser, "work_dir", type=Path, help="folder for uploads and outputs (default: a new temporary folder)")
    _add(parser, "max_queue", type=int, default=8, help="requests that may wait; more are refused (default: %(default)s)")
    _add(parser, "max_audio_s", type=float, default=600, help="longest speech a job may have, in seconds (default: %(default)s)")
    _add(parser, "size", default="704*384", help=f"{size_help} (default: %(default)s)")
    _add_realtime_args(parser)


def _add_realtime_args(parser) -> None:
    """Real-time presets (liveavatar.engine.realtime): measured speeds, the start-up calibration, the choice."""
    from liveavatar.engine.realtime import CANDIDATE_SIZES, CANDIDATE_STEPS

    r = parser.add_argument_group("real time")
    _add(r, "realtime", action="store_true", help="pick the largest size, then the most steps (4, then 3), that this "
         "machine generates at 1.1x real time or faster, measured by a short calibration at start-up (a live "
         "session per candidate on a synthetic input; on a GPU each new size compiles first, about a minute) "
         "unless the speed table has it; live sessions that name no size run it, and the app starts with it")
    _add(r, "calibrate", choices=["missing", "always", "never"], default=None,
         help="the start-up calibration: 'missing' measures the candidates the speed table lacks for this GPU and "
              "mode (the default with --realtime), 'always' measures them again, 'never' trusts the table "
              "(the default without --realtime)")
    _add(r, "speed_table", type=Path, default=None, help="the JSON file of measured speeds per GPU, size and step "
         "count (default: $LIVEAVATAR_SPEED_TABLE or ~/.cache/liveavatar/speed.json)")
    _add(r, "realtime_sizes", default=",".join(CANDIDATE_SIZES), help="the candidate sizes, comma-separated "
         "(default: %(default)s)")
    _add(r, "realtime_steps", default=",".join(map(str, CANDIDATE_STEPS)), help="the candidate step counts in the "
         "order preferred (default: %(default)s)")


# Flags whose effect is always on (or that only select what is already the one behaviour).
COMPAT_NOTICE = {
    "enable_online_decode": "decoding is always online (each block is decoded as soon as it is denoised)",
    "load_lora": "the Live Avatar LoRA is always merged",
    "convert_model_dtype": "weights are always converted to --dtype at load",
    "single_gpu": "one process is the default; use --gpus N for several",
    "training_config": "the LoRA scale (alpha/rank = 64/128) is built in",
    "task": "only s2v-14B exists",
    "num_gpus_dit": "use --gpus",
    "offload_kv_cache": "KV caches stay on the device",
}
# Flags the original parses and then ignores: refused unless given their only effective value.
COMPAT_REFUSED = {
    "sample_guide_scale": "the distilled model uses no classifier-free guidance; only 0 is accepted",
    "sample_solver": "the distilled sampler is Euler; only 'euler' is accepted",
    "ulysses_size": "sequence parallelism is not implemented (the pipeline splits denoising steps across GPUs); only 1 is accepted",
    "sample_shift": "the timesteps are fixed by the distillation (shift 3 applied twice); this flag had no effect in the original",
}
_REFUSED_OK = {"sample_guide_scale": {"0", "0.0"}, "sample_solver": {"euler"}, "ulysses_size": {"1"}}


# The original's CosyVoice options that clone a voice from a recording: refused, not silently dropped.
TTS_CLONING = ("tts_prompt_audio", "tts_prompt_text")
TTS_CLONING_WHY = ("cloning a voice from a prompt recording (CosyVoice) is not implemented; pick a voice with "
                   "--voice (`liveavatar voices` lists them)")


def _check_text_input(args) -> list[str]:
    """Maps the original's --enable_tts/--tts_text onto --text and checks that exactly one of --audio and --text
    is given; returns the notices. (Text, engine and voice are checked when the text is synthesised.)"""
    notices = []
    for flag in TTS_CLONING:
        if getattr(args, flag) is not None:
            raise LiveAvatarError(f"--{flag}: refused, {TTS_CLONING_WHY}")
    if args.tts_text is not None:
        if args.text is not None:
            raise LiveAvatarError("--tts_text and --text: give the text once (--tts_text is the original's name for --text)")
        args.text = args.tts_text
        notices.append("--tts_text: accepted as --text")
    if args.enable_tts is not None and args.enable_tts.strip().lower() not in ("0", "false", "no", "off"):
        if args.text is None:
            raise LiveAvatarError("--enable_tts: give the words to speak with --text")
        notices.append(f"--enable_tts: accepted; the text is spoken by the {args.tts or 'espeak'} engine (--tts)")
    if args.audio is not None and args.text is not None:
        raise LiveAvatarError("--audio and --text: give one of them (a speech file, or words to speak)")
    if args.audio is None and args.text is None:
        raise LiveAvatarError("no speech: give --audio FILE (a recording) or --text 'words to speak'")
    if args.text is None:
        for flag in ("voice", "tts"):
            if getattr(args, flag) is not None:
                raise LiveAvatarError(f"--{flag}: only used with --text (the speech comes from --audio)")
    return notices


def _check_compat(args) -> list[str]:
    """Raises for refused flags; returns the notices for accepted ones (logged once the run log is open)."""
    notices = [f"--{flag}: accepted; {why}" for flag, why in COMPAT_NOTICE.items() if getattr(args, flag) is not None]
    if args.task not in (None, "True", "s2v-14B"):
        raise LiveAvatarError(f"--task {args.task}: only s2v-14B is supported")
    for flag, why in COMPAT_REFUSED.items():
        value = getattr(args, flag)
        if value is not None and value.strip().lower() not in _REFUSED_OK.get(flag, set()):
            raise LiveAvatarError(f"--{flag} {value}: refused, {why}")
    return notices


def _default_output(args) -> Path:
    from liveavatar.engine.multi_person import split_plus

    if args.audio is None:  # a text job: named by its first words
        words = "_".join("".join(c for c in w if c.isascii() and c.isalnum()) for w in args.text.split()[:4]).strip("_")
        return args.save_dir / f"{args.image.stem}_{words[:40].strip('_') or 'text'}.mp4"
    return args.save_dir / f"{args.image.stem}_{split_plus(args.audio)[0].stem}.mp4"


class _RunLog(logging.FileHandler):
    """The run log. Names that are not UTF-8 (file names, arguments) are written escaped, and a full disk, which
    the job reports itself, adds no logging traceback to that one-line error."""

    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8", errors="backslashreplace")

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], OSError) and sys.exc_info()[1].errno == errno.ENOSPC:
            return
        super().handleError(record)


def _setup_logging(level: str, log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(_RunLog(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)


def cmd_generate(args, stop: "_StopFlag") -> int:
    import torch
    from tqdm import tqdm

    from liveavatar.engine.job import (
        STATE_DIR_SUFFIX, JobResult, JobSpec, preflight, run_job, speech_file_for, synthesize_text,
    )
    from liveavatar.engine.multi_person import Speakers, split_plus
    from liveavatar.interfaces.backend import NO_GPU, Backend, resolve_device

    _setup_logging(args.log_level, None)
    notices = _check_text_input(args)
    output = args.save_file or _default_output(args)
    notices += _check_compat(args)
    # Without --device and without a GPU, NO_GPU is said after the inputs are checked, before anything loads.
    device, dtype = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.dtype,
                                   args.fp8)
    if args.gpus != 1 and args.resume:
        raise LiveAvatarError("--resume: a run on several GPUs keeps its caches in several processes and cannot be "
                              "resumed; use --gpus 1")
    tracks, speakers = ([] if args.audio is None else split_plus(args.audio)), None
    if args.masks is not None and args.text is not None:
        raise LiveAvatarError("--masks: for several speech tracks (--audio a.wav+b.wav); a --text speaks for one person")
    if len(tracks) > 1 or args.masks is not None:  # several people in the picture
        speakers = Speakers(tuple(tracks), None if args.masks is None else tuple(split_plus(args.masks)))
    spec = JobSpec(
        image=args.image, audio=tracks[0] if args.text is None else speech_file_for(output), prompt=args.prompt,
        output=output, size=args.size, num_clip=args.num_clip,
        infer_frames=args.infer_frames, sample_steps=args.sample_steps, seed=args.base_seed,
        save_latents=args.save_latents, resume=args.resume, trim_silence=args.trim_silence,
        normalize_loudness=args.normalize_loudness, rolling_sink=args.sink_frame == "rolling",
        text=args.text, voice=args.voice, tts=args.tts, speakers=speakers, lead_in=not args.original_timing,
        overwrite=args.overwrite,
    )
    # A resumed text job speaks the speech its interrupted run synthesised (a neural voice need not repeat itself).
    synthesize_text(spec, reuse=args.resume and Path(str(output) + STATE_DIR_SUFFIX).exists())
    warnings: list[str] = []
    preflight(spec, warnings)
    if args.device is None and not torch.cuda.is_available():
        raise LiveAvatarError(NO_GPU)  # before the weights are looked for (a first run downloads 50 GB)
    _setup_logging(args.log_level, output.with_suffix(".log"))  # only once the output folder is known good
    log.info("run: %s", shlex.join(["liveavatar", *args.argv]))  # pastes back into a shell
    for notice in notices:
        log.info("%s", notice)
    if spec.text is not None:
        log.info("speech: %d characters of text spoken by the %s engine (voice %s) into %s", len(spec.text),
                 spec.tts or "espeak", spec.voice or "default", spec.audio)
    for warning in warnings:  # before anything loads: a small image, --num_clip beyond the speech
        log.warning("%s", warning)
    log.info("device %s (%s), torch %s", device, dtype, torch.__version__)
    backend = Backend.from_args(args)
    if backend.decoder.path is not None:
        log.info("decoder %s: %s", backend.decoder.name, backend.decoder.path)
    pipe = backend.open()
    bar = None
    gpu_csv = output.with_suffix(".gpu_memory.csv") if device.startswith("cuda") else None
    if gpu_csv is not None:
        gpu_csv.write_text("block,elapsed_s,allocated_gb,reserved_gb\n")
    try:
        for item in run_job(pipe, spec, should_stop=lambda: stop.requested, log_notices=False):
            if isinstance(item, JobResult):
                if bar is not None:
                    bar.close()
                log.info("wrote %s: %d frames %dx%d in %.1f s (%.2f FPS generated, first frame after %.2f s)",
                         item.output, item.frames, item.width, item.height, item.seconds, item.generation_fps,
                         item.first_frame_s)
                log.info("mean per block (ms): %s", {k: round(v, 1) for k, v in item.stage_ms.items()})
                gpu = f", GPU {item.peak_gpu_memory_gb:.2f} GiB" if item.peak_gpu_memory_gb is not None else ""
                log.info("peak memory: host %.2f GiB%s", item.peak_host_memory_gb, gpu)
                if spec.text is not None:  # the speech is in the video; its file was kept only for --resume
                    Path(spec.audio).unlink(missing_ok=True)
                _print_path(item.output)
                return 0
            if bar is None:
                # Started with the first block already counted: its frames took the whole start-up, and counting
                # them as one update at once would show thousands of frames per second.
                bar = tqdm(total=item.frames_total, initial=item.frames_done, unit="frame", desc="generating",
                           dynamic_ncols=True)
            else:
                bar.update(len(item.block.frames))
            bar.set_postfix(clip=item.block.clip, block=f"{item.blocks_done}/{item.blocks_total}")
            if gpu_csv is not None:
                with gpu_csv.open("a") as f:
                    f.write(f"{item.block.index},{item.elapsed_s:.3f},{torch.cuda.memory_allocated() / 2**30:.3f},"
                            f"{torch.cuda.memory_reserved() / 2**30:.3f}\n")
    finally:
        if bar is not None:  # closed before an error is printed, which must stay the last line
            bar.close()
        pipe.close()  # with --gpus, stops the other ranks
    return 1


def _print_path(path: Path) -> None:
    """Prints the path's own bytes: a file name need not be UTF-8, and scripts read this line to find the video."""
    sys.stdout.flush()
    if hasattr(sys.stdout, "buffer"):
        sys.stdout.buffer.write(os.fsencode(path) + b"\n")
        sys.stdout.buffer.flush()
    else:  # a text-only stream (a caller's StringIO)
        print(os.fsdecode(path))


# What `app` and `serve` import from the optional 'app' extra (pyproject.toml), checked before any model loads.
APP_EXTRA_MODULES = {"app": ("gradio",), "serve": ("fastapi", "uvicorn", "python_multipart", "websockets")}
APP_EXTRA_PACKAGES = {"gradio", "fastapi", "starlette", "uvicorn", "python_multipart", "multipart", "websockets"}


def _require_app_extra(command: str) -> None:
    missing = []
    for module in APP_EXTRA_MODULES[command]:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if (e.name or module).split(".")[0] not in APP_EXTRA_PACKAGES:
                raise
            missing.append((e.name or module).split(".")[0])
    if missing:
        raise LiveAvatarError(_missing_extra(command, missing))


def _missing_extra(command: str, missing: list[str]) -> str:
    return (f"`liveavatar {command}` needs the optional 'app' extra ({', '.join(missing)} not installed): run "
            f"bash scripts/setup.sh app, or pip install -e '.[app]' in the checkout")


def cmd_app(args, *_unused) -> int:  # Gradio and uvicorn handle Ctrl-C themselves
    _require_app_extra("app")
    from liveavatar.interfaces import app

    return app.main(args)


def cmd_serve(args, *_unused) -> int:
    _require_app_extra("serve")
    from liveavatar.interfaces import server

    return server.main(args)


def cmd_download(args, stop: "_StopFlag") -> int:
    from liveavatar.weights import hub

    _setup_logging("INFO", None)
    if args.tts is not None or args.voice is not None:
        print(_download_voice(args.tts, args.voice))
        return 0
    print(hub.download(args.ckpt_dir, decoders=(args.decoder,)))
    return 0


def _download_voice(engine: str | None, voice: str | None) -> Path:
    from liveavatar import tts

    if engine is None:
        raise LiveAvatarError("--voice: name the engine too, e.g. --tts piper")
    engine = engine.strip().lower()
    if engine not in tts.engine_names():
        raise LiveAvatarError(f"--tts {engine}: unknown speech engine; pick one of {', '.join(tts.engine_names())}")
    if engine != "piper":
        raise LiveAvatarError(f"--tts {engine}: its voices come with the engine; only piper voices are downloaded")
    from liveavatar.tts.piper import PiperEngine, download_voice

    voice = voice or PiperEngine.default_voice
    log.info("downloading the Piper voice %s", voice)
    path = download_voice(voice)
    if not PiperEngine.available():
        log.warning("the voice is downloaded; to speak with it: %s", PiperEngine.install_hint)
    return path


def cmd_voices(args, stop: "_StopFlag") -> int:
    from liveavatar import tts

    if args.tts is None:
        for line in tts.describe_engines():
            print(line)
        return 0
    engine = tts.get_engine(args.tts)
    voices = engine.voices()
    for voice in voices:
        print(voice)
    if not voices:
        print(f"no {engine.name} voices here yet: `liveavatar download --tts {engine.name} --voice NAME` fetches one",
              file=sys.stderr)
    return 0


class _StopFlag:
    """First Ctrl-C / SIGTERM: finish the current block, keep everything, exit. Second: stop at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after the current block (press Ctrl-C again to stop at once)", file=sys.stderr)


def _log_to_files(message: str) -> None:
    """Records an error in the run log without printing it twice on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    stop = _StopFlag()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return {"generate": cmd_generate, "download": cmd_download, "app": cmd_app, "serve": cmd_serve,
                "voices": cmd_voices}[args.command](args, stop)
    except LiveAvatarError as e:
        _log_to_files(str(e))
        print(f"error: {e}", file=sys.stderr)
        return 130 if isinstance(e, JobStopped) else 2
    except KeyboardInterrupt:
        print("interrupted: the partial video and resume state are kept; rerun with --resume to continue", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
