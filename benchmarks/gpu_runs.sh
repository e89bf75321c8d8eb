#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, one runner process per configuration (each builds its own
# random 16.3 B-parameter model), raw JSON into $OUT (or ./bench_out). Usage: bash benchmarks/gpu_runs.sh NAME...
# with NAME among: stages bf16 bf16_compiled fp8_compiled offload24 offload24_fp8 fp8_48 load fp8_light bf16_light
#
# A/B against an earlier commit in the same device call (the lent GPUs differ by up to 20 %): check the commit out
# into an ignored folder of this checkout (`git worktree add .baseline <commit>`, `.baseline` in .git/info/exclude,
# named in the device call's carry), then
# `BASELINE=.baseline bash benchmarks/gpu_runs.sh ab:fp8_compiled`: the run there, here, there again and here
# again, into $OUT/base/NAME*.json and $OUT/NAME*.json (runs 1 and 2).
set -uo pipefail
OUT=$(realpath -m "${OUT:-bench_out}")
mkdir -p "$OUT"
run() {  # name, seconds allowed, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? after ${SECONDS}s"
  grep -E "Error|error:" "$OUT/$name.log" | tail -n 3
}
bench() {  # name, seconds allowed, runner arguments...
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" python3 -m benchmarks.run "$@" --json "$OUT/$name.json"
}
keep() {  # folder, name, round: the run's files renamed for its round
  local file
  for file in "$1/$2.json" "$1/$2.log"; do
    [[ -f $file ]] && mv "$file" "${file%.*}_$3.${file##*.}"
  done
  return 0
}
one() {  # a named run
  local name=$1
  case $name in
    bf16) bench bf16 150 --blocks 12 --steady_from 6 ;;
    bf16_compiled) bench bf16_compiled 140 --compile --profile --blocks 16 --steady_from 9 ;;
    fp8_compiled) bench fp8_compiled 150 --compile --fp8 --profile --blocks 16 --steady_from 9 ;;
    # The light TAEW2.1 decoder, then the VAE's, on the same model (two warm-up + measured streams).
    fp8_light) bench fp8_light 300 --compile --fp8 --profile --decoder taew2_1 wan --blocks 16 --steady_from 9 ;;
    bf16_light) bench bf16_light 300 --compile --decoder taew2_1 wan --blocks 16 --steady_from 9 ;;
    # Blocks 0-3 stream every transformer block; before block 4 those that fit stay on the GPU.
    offload24) bench offload24 500 --offload --kv_fp8 --memory_gb 24 --blocks 10 --steady_from 6 ;;
    offload24_fp8) bench offload24_fp8 500 --offload --fp8 --kv_fp8 --memory_gb 24 --blocks 10 --steady_from 6 ;;
    stages) run stages 120 python3 -m benchmarks.bench_stages --json "$OUT/stages.json" ;;
    fp8_48) bench fp8_48 100 --compile --fp8 --kv_fp8 --memory_gb 48 --blocks 10 --steady_from 7 ;;
    load) run load 150 python3 -m benchmarks.load_time --json "$OUT/load.json" ;;
    *) echo "unknown run $name"; exit 2 ;;
  esac
}
for name in "$@"; do
  if [[ $name == ab:* ]]; then
    name=${name#ab:}
    [[ -d ${BASELINE:-} ]] || { echo "ab:$name needs BASELINE, a checkout of the commit to compare with"; exit 2; }
    mkdir -p "$OUT/base"
    for round in 1 2; do
      (cd "$BASELINE" && OUT="$OUT/base" one "$name")
      keep "$OUT/base" "$name" "$round"
      one "$name"
      keep "$OUT" "$name" "$round"
    done
  else
    one "$name"
  fi
done
