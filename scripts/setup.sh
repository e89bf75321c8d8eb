#!/usr/bin/env bash
# Installs liveavatar into the current Python environment.
#   bash scripts/setup.sh          # the package and its command
#   bash scripts/setup.sh dev      # + test tools
#   bash scripts/setup.sh app,dev  # + web UI / server
#   bash scripts/setup.sh tts      # + Piper's neural voices for --text (the built-in engine is eSpeak NG, a
#                                  #   system package: apt-get install espeak-ng / brew install espeak-ng)
#   bash scripts/setup.sh multi    # + automatic masks for several speakers (a face detector)
# An installed torch is kept as it is (a CUDA build stays a CUDA build). Without one, a CUDA build is
# installed on machines with an NVIDIA driver and the CPU build elsewhere (never a multi-GB CUDA
# download on a CPU-only machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}

if ! "$PY" -c "import torch" 2>/dev/null; then
  # A CPU wheel placed on the machine (LIVEAVATAR_TORCH_WHEEL, or /opt/wheels) is used as it is.
  wheel=${LIVEAVATAR_TORCH_WHEEL:-$(ls /opt/wheels/torch-*.whl 2>/dev/null | head -n 1)}
  if [ -n "$wheel" ]; then
    "$PY" -m pip install -q "$wheel"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.4"
  else
    "$PY" -m pip install "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
# Pin whatever torch is installed so the resolver cannot swap it for another build. The version comes from the
# package metadata: importing torch before NumPy is installed prints "Failed to initialize NumPy".
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > "$constraints"
target="."
[ -n "$extras" ] && target=".[$extras]"
"$PY" -m pip install -q -c "$constraints" -e "$target"
"$PY" -c "import torch, liveavatar; print(f'liveavatar {liveavatar.__version__} installed (torch {torch.__version__}, CUDA: {torch.cuda.is_available()})')"
command -v espeak-ng >/dev/null 2>&1 || echo "note: --text (text to speech) needs eSpeak NG: apt-get install espeak-ng (Debian/Ubuntu) or brew install espeak-ng (macOS)"
