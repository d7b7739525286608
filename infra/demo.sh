#!/usr/bin/env bash
# End-to-end demo on the embedded default (local SeaweedFS + MLflow, Ray on this machine, CPU):
# the whole life of a tiny DetailFlow model from one pipeline file, then images through HTTP.
#
#   make demo                 # sets up .venv, pre-warms DeepSpeed, then runs this script
#   bash infra/demo.sh        # same, with an existing .venv
#   make demo DEMO_DATA=fashion-mnist   # real images: configs/pipelines/fashion-mnist.yaml (Debian's
#                             # dataset-fashion-mnist); adds class accuracy + FID/KID vs the test split
#
# Stages (configs/pipelines/tiny.yaml): synth -> ingest train/val -> tokenizer (2 Ray workers, ZeRO-2)
# -> extract codes -> AR (2 workers, ZeRO-2) -> evaluate tokenizer -> register + gated promotion
# (gFID) -> deploy (Ray Serve). Running it again skips every finished stage (content hashes);
# after a failure it continues from the failed stage.
# Environment: DETAILFLOW (the CLI), DEMO_DATA (shapes | fashion-mnist), DEMO_OUT (outputs, default
# out/demo or out/demo-fmnist), DEMO_PIPELINE (the pipeline file), DEMO_CLASS (class of the coarse-to-fine strip), and every DETAILFLOW_*/AWS_*/MLFLOW_* setting (README).
set -euo pipefail
cd "$(dirname "$0")/.."

DF=${DETAILFLOW:-.venv/bin/detailflow}
DATA=${DEMO_DATA:-shapes}
case "$DATA" in
  shapes)
    OUT=${DEMO_OUT:-out/demo}
    PIPELINE=${DEMO_PIPELINE:-configs/pipelines/tiny.yaml}
    MODEL=tiny ;;
  fashion-mnist)
    FMNIST=/usr/share/datasets/fashion-mnist
    for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz \
             t10k-labels-idx1-ubyte.gz; do
      if [ ! -f "$FMNIST/$f" ]; then
        echo "DEMO_DATA=fashion-mnist needs $FMNIST/$f: install Debian's dataset-fashion-mnist package" \
          "(sudo apt-get install dataset-fashion-mnist; .ci/run installs it)" >&2
        exit 2
      fi
    done
    OUT=${DEMO_OUT:-out/demo-fmnist}
    PIPELINE=${DEMO_PIPELINE:-configs/pipelines/fashion-mnist.yaml}
    MODEL=fmnist ;;
  *)
    echo "DEMO_DATA must be shapes or fashion-mnist, got '$DATA'" >&2
    exit 2 ;;
esac
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
# every class, one row of 8 samples each, in class order (shapes: 00_disc_warm ... 09_ring_cool;
# fashion-mnist: 00_t-shirt ... 09_ankle-boot)
stage sample-grid "$DF" generate $(for c in 0 1 2 3 4 5 6 7 8 9; do printf -- '--class %d ' "$c"; done) \
  --num 8 --seed 0 --out "$OUT/samples.png"
stage coarse-to-fine "$DF" generate --class "$CLASS" --num 1 --seed 0 --out "$OUT/one.png" \
  --strip "$OUT/coarse-to-fine.png"
stage status "$DF" pipeline status "$PIPELINE"
if [ -f "$OUT/score.json" ]; then  # fashion-mnist: the class-score stage's figures
  printf '\n==== class accuracy of samples (project classifier) and FID/KID vs the test split\n'
  cat "$OUT/score.json"
fi

printf '\n==== where to look (demo took %ss)\n' $((SECONDS - T0))
eval "$("$DF" config env | grep -E 'DETAILFLOW_S3_BUCKET|MLFLOW_TRACKING_URI|DETAILFLOW_S3_ENDPOINT_URL|DETAILFLOW_STATE_DIR')"
ENDPOINT=$("$DF" serve status --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["endpoint"]["url"])' || echo "(not running)")
cat <<MSG
MLflow UI        $MLFLOW_TRACKING_URI   (experiments detailflow-pipelines, -tokenizer, -ar, -eval; models $MODEL-generator@champion)
playground       $ENDPOINT/             (API docs: $ENDPOINT/docs; key: detailflow serve status)
samples          $OUT/samples.png   coarse-to-fine strip: $OUT/coarse-to-fine.png
S3 endpoint      $DETAILFLOW_S3_ENDPOINT_URL   (bucket s3://$DETAILFLOW_S3_BUCKET; keys: detailflow config env)
service logs     $DETAILFLOW_STATE_DIR/logs/   (detailflow services logs mlflow|seaweedfs)
stop             $DF serve down && $DF services down
MSG
