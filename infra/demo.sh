#!/usr/bin/env bash
# End-to-end demo on the embedded default (local SeaweedFS + MLflow, Ray on this machine, CPU):
# the whole life of a tiny DetailFlow model from one pipeline file, then images through HTTP.
#
#   make demo                 # sets up .venv, pre-warms DeepSpeed, then runs this script
#   bash infra/demo.sh        # same, with an existing .venv
#
# Stages (configs/pipelines/tiny.yaml): synth -> ingest train/val -> tokenizer (2 Ray workers, ZeRO-2)
# -> extract codes -> AR (2 workers, ZeRO-2) -> evaluate tokenizer -> register + gated promotion
# (gFID) -> deploy (Ray Serve). Running it again skips every finished stage (content hashes);
# after a failure it continues from the failed stage.
# Environment: DETAILFLOW (the CLI), DEMO_OUT (outputs, default out/demo), DEMO_PIPELINE (the pipeline
# file), DEMO_CLASS (class of the coarse-to-fine strip), and every DETAILFLOW_*/AWS_*/MLFLOW_* setting (README).
set -euo pipefail
cd "$(dirname "$0")/.."

DF=${DETAILFLOW:-.venv/bin/detailflow}
OUT=${DEMO_OUT:-out/demo}
PIPELINE=${DEMO_PIPELINE:-configs/pipelines/tiny.yaml}
CLASS=${DEMO_CLASS:-3}
mkdir -p "$OUT"
T0=$SECONDS

stage() {
  local name=$1; shift
  printf '\n==== [%4ss] %s: %s\n' $((SECONDS - T0)) "$name" "$*"
  local t0=$SECONDS
  if ! "$@"; then
    printf '==== %s FAILED (exit above); services stay up for inspection; re-run `make demo` to continue.\n' \
      "$name" >&2
    exit 1
  fi
  printf '==== %s done in %ss\n' "$name" $((SECONDS - t0))
}

stage services "$DF" services up
stage pipeline "$DF" pipeline run "$PIPELINE"
# every class, one row of 8 samples each (rows in class order: 00_disc_warm ... 09_ring_cool)
stage sample-grid "$DF" generate $(for c in 0 1 2 3 4 5 6 7 8 9; do printf -- '--class %d ' "$c"; done) \
  --num 8 --seed 0 --out "$OUT/samples.png"
stage coarse-to-fine "$DF" generate --class "$CLASS" --num 1 --seed 0 --out "$OUT/one.png" \
  --strip "$OUT/coarse-to-fine.png"
stage status "$DF" pipeline status "$PIPELINE"

printf '\n==== where to look (demo took %ss)\n' $((SECONDS - T0))
eval "$("$DF" config env | grep -E 'DETAILFLOW_S3_BUCKET|MLFLOW_TRACKING_URI|DETAILFLOW_S3_ENDPOINT_URL|DETAILFLOW_STATE_DIR')"
ENDPOINT=$("$DF" serve status --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["endpoint"]["url"])' || echo "(not running)")
cat <<MSG
MLflow UI        $MLFLOW_TRACKING_URI   (experiments detailflow-pipelines, -tokenizer, -ar, -eval; models tiny-generator@champion)
playground       $ENDPOINT/             (API docs: $ENDPOINT/docs; key: detailflow serve status)
samples          $OUT/samples.png   coarse-to-fine strip: $OUT/coarse-to-fine.png
S3 endpoint      $DETAILFLOW_S3_ENDPOINT_URL   (bucket s3://$DETAILFLOW_S3_BUCKET; keys: detailflow config env)
service logs     $DETAILFLOW_STATE_DIR/logs/   (detailflow services logs mlflow|seaweedfs)
stop             $DF serve down && $DF services down
MSG
