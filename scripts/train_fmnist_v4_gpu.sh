#!/usr/bin/env bash
# Train two DiT candidates for the Fashion-MNIST backbone after v3 on one GPU, side by side, on v3's VAE
# (issue 12). Both: cosine lr, batch 1024, bf16 autocast (dit_precision=auto on a GPU), EMA 0.9995.
#   cont:  v3's DiT (6 layers, width 128) continued at lr 1e-4.
#   large: a new DiT (8 layers, width 192, 6 heads; 6.1 M parameters) from random init at lr 3e-4.
# The step counts fit a wall-clock budget: a 300-step probe of both (run side by side, as the real runs are)
# measures steps/s, and each run gets floor(rate * budget / 1000) * 1000 steps, recorded in its train_config.json.
#
#   bash scripts/train_fmnist_v4_gpu.sh OUT_DIR [BUDGET_SECONDS]
#
# Writes OUT_DIR/{cont,large} (resumable `gendd backbone train` folders; a run stopped by the guard timeout is
# snapshotted at its last checkpoint) and OUT_DIR/rates.txt.
set -u
out=${1:?usage: train_fmnist_v4_gpu.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-360}
py=${PYTHON:-python3}
mkdir -p "$out"
common=(--vae-steps 0 --checkpoint-every 1000 --quiet --set latent_channels=8 --set lr_schedule=cosine
        --set dit_precision=auto --set ema_decay=0.9995 --set dit_batch_size=1024 --set init_from=fashion-mnist-v3)
cont=(--dit-layers 6 --dit-hidden 128 --dit-heads 4 --set dit_lr=0.0001)
large=(--dit-layers 8 --dit-hidden 192 --dit-heads 6 --set dit_lr=0.0003 --set init_dit=false)

rate() {  # steps/s between the DiT log records at steps 100 and 300
  "$py" - "$1/train_log.jsonl" <<'EOF'
import json, sys
rec = {r["step"]: r["seconds"] for r in map(json.loads, open(sys.argv[1])) if r["stage"] == "dit"}
print(200 / (rec[300] - rec[100]))
EOF
}

"$py" -m gendd backbone train --out "$out/probe-cont" --dit-steps 300 "${common[@]}" "${cont[@]}" &
"$py" -m gendd backbone train --out "$out/probe-large" --dit-steps 300 "${common[@]}" "${large[@]}" &
wait
rc=$(rate "$out/probe-cont") && rl=$(rate "$out/probe-large") || { echo "error: the probes did not finish"; exit 1; }
steps() { "$py" -c "import sys; print(max(1000, int(float(sys.argv[1]) * $budget) // 1000 * 1000))" "$1"; }
sc=$(steps "$rc"); sl=$(steps "$rl")
echo "probe steps/s: cont $rc large $rl; steps: cont $sc large $sl (budget ${budget}s)" | tee "$out/rates.txt"
rm -rf "$out/probe-cont" "$out/probe-large"

guard=$((budget * 6 / 5 + 30))
train() {  # name steps args...
  local name=$1 n=$2; shift 2
  timeout "$guard" "$py" -m gendd backbone train --out "$out/$name" --dit-steps "$n" "${common[@]}" "$@"
  local code=$?
  if [ $code -ne 0 ]; then
    echo "$name stopped with exit $code; snapshot of its last checkpoint"
    "$py" -m gendd backbone snapshot --run "$out/$name" --out "$out/$name-snapshot"
  fi
}
train cont "$sc" "${cont[@]}" &
train large "$sl" "${large[@]}" &
wait
tail -n 1 "$out"/cont/train_log.jsonl "$out"/large/train_log.jsonl
