#!/usr/bin/env bash
# End-to-end demo on the embedded default (local SeaweedFS + MLflow, in-process Ray, CPU).
#
#   make demo                 # sets up .venv, pre-warms DeepSpeed, then runs this script
#   bash infra/demo.sh        # same, with an existing .venv
#
# Each pipeline stage is one `stage NAME command...` line below; add new stages in order
# (data -> train tokenizer -> extract codes -> train AR -> evaluate -> register -> serve).
# Environment: DETAILFLOW (the CLI to call), DEMO_OUT (outputs, default out/demo), and every
# DETAILFLOW_*/AWS_*/MLFLOW_* setting (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

DF=${DETAILFLOW:-.venv/bin/detailflow}
OUT=${DEMO_OUT:-out/demo}
mkdir -p "$OUT"

stage() {
  local name=$1; shift
  printf '\n==== stage %s: %s\n' "$name" "$*"
  local t0=$SECONDS
  if ! "$@"; then
    printf '==== stage %s FAILED (exit above); services stay up for inspection.\n' "$name" >&2
    exit 1
  fi
  printf '==== stage %s done in %ss\n' "$name" $((SECONDS - t0))
}

stage services "$DF" services up

# ---- data: a tiny procedural class-conditional dataset, ingested to S3 as Parquet shards -----
stage data-synth "$DF" data synth --out "$OUT/shapes" --size 32 --per-class 16 --val-per-class 4
stage data-ingest-train "$DF" data ingest "$OUT/shapes" --name demo-shapes --split train --local
stage data-ingest-val "$DF" data ingest "$OUT/shapes" --name demo-shapes --split val --local
stage data-show "$DF" data show demo-shapes --split train --out "$OUT/demo-shapes_train.png"

# ---- training: smoke-sized runs (seconds of compute each; Ray + DeepSpeed ZeRO-2 on 2 CPU workers) --
# Run names are deterministic (config + date), so re-running the demo resumes instead of repeating.
TOK_RUN=$("$DF" train show --config configs/tokenizer-smoke.yaml tokenizer dataset=demo-shapes \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["run_name"])')
stage train-tokenizer "$DF" train tokenizer --config configs/tokenizer-smoke.yaml dataset=demo-shapes
stage extract-codes "$DF" extract-codes --tokenizer "$TOK_RUN" --dataset demo-shapes
stage train-ar "$DF" train ar --config configs/ar-smoke.yaml tokenizer="$TOK_RUN"

# ---- next stages go here (evaluate, register, serve) ---------------------------------------------

printf '\n==== where to look\n'
eval "$("$DF" config env | grep -E 'DETAILFLOW_S3_BUCKET|MLFLOW_TRACKING_URI|DETAILFLOW_S3_ENDPOINT_URL|DETAILFLOW_STATE_DIR')"
cat <<MSG
MLflow UI        $MLFLOW_TRACKING_URI
S3 endpoint      $DETAILFLOW_S3_ENDPOINT_URL   (bucket s3://$DETAILFLOW_S3_BUCKET; keys: detailflow config env)
demo outputs     $OUT/
service logs     $DETAILFLOW_STATE_DIR/logs/   (detailflow services logs mlflow|seaweedfs)
stop services    $DF services down
MSG
printf '\n'
"$DF" services status
