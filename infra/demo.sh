#!/usr/bin/env bash
# End-to-end demo on the embedded default (local SeaweedFS + MLflow, in-process Ray, CPU).
#
#   make demo                 # sets up .venv, pre-warms DeepSpeed, then runs this script
#   bash infra/demo.sh        # same, with an existing .venv
#
# Each pipeline stage is one `stage NAME command...` line below; add new stages in order
# (data -> train tokenizer -> extract codes -> train AR -> evaluate -> register -> serve).
# Environment: DETAILFLOW (the CLI to call), DEMO_OUT (outputs, default out/demo), DEMO_MODEL,
# DEMO_TOK_STEPS, DEMO_AR_STEPS, DEMO_PER_CLASS (sizes, below), and every
# DETAILFLOW_*/AWS_*/MLFLOW_* setting (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

DF=${DETAILFLOW:-.venv/bin/detailflow}
OUT=${DEMO_OUT:-out/demo}
MODEL=${DEMO_MODEL:-tiny}            # tiny (minutes on 2 cores) | smoke (seconds, a plumbing check)
TOK_STEPS=${DEMO_TOK_STEPS:-300}     # the full tiny recipe is 3,500 (configs/tokenizer-tiny.yaml)
AR_STEPS=${DEMO_AR_STEPS:-400}       # the full tiny recipe is 2,000 (configs/ar-tiny.yaml)
PER_CLASS=${DEMO_PER_CLASS:-64}      # training images per class (10 classes)
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
stage data-synth "$DF" data synth --out "$OUT/shapes" --size 32 --per-class "$PER_CLASS" --val-per-class 8
stage data-ingest-train "$DF" data ingest "$OUT/shapes" --name demo-shapes --split train --local
stage data-ingest-val "$DF" data ingest "$OUT/shapes" --name demo-shapes --split val --local
stage data-show "$DF" data show demo-shapes --split train --out "$OUT/demo-shapes_train.png"

# ---- training: the tiny model (spec §6) with Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers ------
# Run names are deterministic (config + date), so re-running the demo resumes instead of repeating.
TOK_ARGS=(--config "configs/tokenizer-$MODEL.yaml" dataset=demo-shapes steps="$TOK_STEPS" num_workers=2 zero_stage=2)
AR_ARGS=(--config "configs/ar-$MODEL.yaml" steps="$AR_STEPS" num_workers=2 zero_stage=2)
TOK_RUN=$("$DF" train show tokenizer "${TOK_ARGS[@]}" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["run_name"])')
stage train-tokenizer "$DF" train tokenizer "${TOK_ARGS[@]}"
stage extract-codes "$DF" extract-codes --tokenizer "$TOK_RUN" --dataset demo-shapes
stage train-ar "$DF" train ar "${AR_ARGS[@]}" tokenizer="$TOK_RUN"

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
