"""The model behind a command: where the weights are, which device, and one process or the multi-GPU
pipeline. `generate`, `app` and `serve` open their pipeline here, so the same flags mean the same thing in
all three."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.runtime import RuntimeOptions
from liveavatar.errors import LiveAvatarError
from liveavatar.models.taehv import DecoderChoice

@dataclass(frozen=True)
class Backend:
    """What the model flags ask for, resolved: the weights' files, the device and dtype, the options."""

    ckpt_dir: Path
    lora_file: Path | None
    device: str
    dtype: torch.dtype
    fp8: bool = False
    offload_model: bool = False
    gpus: int = 1
    sample_steps: int = 4  # the step count a multi-GPU pipeline is laid out for
    decoder: DecoderChoice = DecoderChoice()  # the streams' decoder (--decoder, --decoder_path)

    @classmethod
    def from_args(cls, args) -> "Backend":
        """Checks the flags (before anything is loaded) and finds the weights (the Hugging Face cache without
        --ckpt_dir); raises LiveAvatarError with the flag's name."""
        from liveavatar.weights import hub
        from liveavatar.weights.checkpoint import CheckpointLayout

        device, dtype = resolve_device(args.device, args.dtype, args.fp8)
        gpus = args.gpus
        sample_steps = getattr(args, "sample_steps", 4)
        if gpus != 1:
            _check_parallel(gpus, sample_steps, device, args.offload_model)
        if args.ckpt_dir is not None:
            ckpt_dir, lora = args.ckpt_dir, None
        else:
            ckpt_dir, lora = hub.cached_checkpoint()
        if args.lora_path_dmd:
            lora = hub.resolve_lora(args.lora_path_dmd)
        layout = CheckpointLayout.from_dir(ckpt_dir, lora)
        layout.require_complete()
        decoder = _decoder_choice(args.decoder, args.decoder_path, ckpt_dir if args.ckpt_dir is not None else None)
        backend = cls(Path(ckpt_dir), lora, device, dtype, args.fp8, args.offload_model, gpus, sample_steps, decoder)
        backend.check_memory(layout, args.size)
        return backend

    def check_memory(self, layout, size: str) -> None:
        """Refuses, with the numbers, a mode whose memory (counted for the pixel budget `size`) exceeds this GPU's
        or, for the low-memory mode's pinned buffers, this machine's available host memory. One GPU only: with
        several, each rank holds a share that the schedule decides."""
        from liveavatar.engine import footprint
        from liveavatar.media.image import parse_size
        from liveavatar.models.dit import S2VConfig

        if not self.device.startswith("cuda") or self.gpus != 1:
            return
        config = S2VConfig.from_json(layout.dit_config)
        encoders = footprint.largest_file(layout.t5_file) + footprint.largest_file(layout.wav2vec2_dir)
        need = footprint.footprint(config, parse_size(size), self.sample_steps, self.fp8, self.offload_model, encoders)
        mode = " ".join(["--offload_model"] * self.offload_model + ["--fp8"] * self.fp8) or "the default mode (bf16)"
        footprint.check_fits(need, mode, size, footprint.gpu_memory(self.device), footprint.host_memory_available())

    @property
    def options(self) -> RuntimeOptions:
        """How the models run, from the flags. On a GPU: the compiled fast path with CUDA graphs, and the encoders
        off the GPU after use (the bf16 transformer and its caches fill an 80 GB card); --offload_model streams
        the transformer too, with FP8 ring caches in host memory."""
        cuda = self.device.startswith("cuda")
        return RuntimeOptions(fp8=self.fp8, compile=cuda, offload_encoders=self.offload_model or cuda,
                              offload_transformer=self.offload_model,
                              kv_dtype=torch.float8_e4m3fn if self.offload_model else None, decoder=self.decoder)

    def open(self) -> LiveAvatarPipeline:
        """Loads the models with `options` applied. With gpus > 1 the other ranks are started; close() the pipeline
        to stop them."""
        if self.gpus != 1:
            from liveavatar.parallel.launch import CheckpointModels, start_pipeline

            return start_pipeline(CheckpointModels(self.ckpt_dir, self.lora_file, self.dtype), self.gpus,
                                  sample_steps=self.sample_steps, device_type=self.device, options=self.options,
                                  cpu_threads=max(1, torch.get_num_threads() // self.gpus))
        return LiveAvatarPipeline.from_pretrained(self.ckpt_dir, lora_file=self.lora_file, device=self.device,
                                                  dtype=self.dtype, options=self.options)


def _decoder_choice(name: str, path: str | None, ckpt_dir) -> DecoderChoice:
    """--decoder and --decoder_path, resolved to a weights file that exists and is no obvious mix-up."""
    from liveavatar.weights import hub
    from liveavatar.weights.files import require_weights

    if name == "wan":
        if path is not None:
            raise LiveAvatarError(f"--decoder_path {path}: only used with --decoder taew2_1 (the Wan VAE's decoder "
                                  f"comes with --ckpt_dir)")
        return DecoderChoice()
    file = hub.resolve_tiny_decoder(path, ckpt_dir)
    return DecoderChoice(name, require_weights(file, "TAEW2.1 decoder (taew2_1.pth or taew2_1.safetensors)"))


NO_GPU = ("no CUDA GPU found (torch sees none): the 14B model needs an NVIDIA GPU with 24 GB or more, so nothing was "
          "downloaded or loaded; on a GPU machine run bash scripts/setup.sh (it installs a CUDA build of torch), or pass "
          "--device cpu to run on the CPU anyway (hours per second of video; the weights, about 50 GB, are downloaded "
          "unless --ckpt_dir has them)")


def open_realtime(args, pipe, worker):
    """The service's real-time view (`--realtime`, `--calibrate`, `--speed_table`, the candidates) for an open
    pipeline; queues the start-up calibration on the worker when asked. Returns the Realtime."""
    import logging

    from liveavatar.engine import realtime as rt
    from liveavatar.engine.calibration import CalibrationTask

    try:
        sizes = [rt.normalize_size(s) for s in args.realtime_sizes.split(",") if s.strip()]
        for size in sizes:
            rt.size_area(size)
        steps = [int(n) for n in args.realtime_steps.split(",") if n.strip()]
    except ValueError:
        raise LiveAvatarError(f"--realtime_sizes {args.realtime_sizes!r} / --realtime_steps {args.realtime_steps!r}: "
                              "expected sizes like 704*384,384*256 and step counts like 4,3") from None
    table = rt.SpeedTable(args.speed_table or rt.default_table_path(), rt.machine_name(pipe))
    realtime = rt.Realtime(table, sizes, steps, default=args.realtime, fixed_steps=pipe.fixed_sample_steps)
    worker.realtime = realtime
    mode = args.calibrate or ("missing" if args.realtime else "never")
    log = logging.getLogger("liveavatar")
    log.info("speed table %s (machine %s)", table.path, table.machine)
    if mode != "never":
        worker.submit(CalibrationTask(realtime, redo=mode == "always"))
    elif args.realtime:
        choice = realtime.choice()
        log.info("real-time preset: %s", f"{choice.size} at {choice.steps} steps ({choice.reason})" if choice.size
                 else f"none ({choice.reason})")
    return realtime


def resolve_device(device: str | None, dtype: str | None, fp8: bool) -> tuple[str, torch.dtype]:
    """(device, dtype): cuda unless a device is given, bfloat16 on a GPU and float32 on the CPU. Without --device
    and without a GPU this refuses (NO_GPU), before anything is downloaded or loaded: the released model does not
    run on a CPU in any useful time, and a CPU run has to be asked for."""
    if device is None and not torch.cuda.is_available():
        raise LiveAvatarError(NO_GPU)
    device = device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LiveAvatarError(f"--device {device}: no CUDA GPU is available (use --device cpu)")
    dtype_name = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if fp8:
        from liveavatar.models.fp8 import scaled_mm_supported

        if not scaled_mm_supported(torch.device(device)):
            raise LiveAvatarError(f"--fp8: needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper), "
                                  f"not {device}; run without --fp8")
    return device, getattr(torch, dtype_name)


def _check_parallel(gpus: int, sample_steps: int, device: str, offload_model: bool) -> None:
    from liveavatar.parallel.schedule import Schedule

    try:
        Schedule(gpus, sample_steps)  # the released model's depth; start_pipeline checks the checkpoint's own
    except ValueError as e:
        raise LiveAvatarError(f"--gpus {gpus}: {e}") from None
    if offload_model:
        raise LiveAvatarError("--offload_model: with --gpus each GPU holds the transformer and only its own steps' "
                              "caches; the low-memory mode streams them on one GPU (use --gpus 1)")
    if ":" in device:
        raise LiveAvatarError(f"--device {device} with --gpus {gpus}: the ranks use cuda:0..{gpus - 1}; "
                              "choose the GPUs with CUDA_VISIBLE_DEVICES")
    if device == "cuda" and torch.cuda.device_count() < gpus:
        raise LiveAvatarError(f"--gpus {gpus}: {torch.cuda.device_count()} GPU(s) visible")
