#!/usr/bin/env bash
# The main job on the repo's sample data: ingest -> extract -> compare (which writes the report).
#
#   ./run_pipeline.sh                   # sample category task: MobileNet ImageNet vs random-init features
#   ./run_pipeline.sh configs/NAME      # reproduce an experiment (headstart reproduce configs/NAME)
#   ./run_pipeline.sh --direct_running_mode=multi_processing   # extra flags go to the Beam stages
#
# Sets up .venv first (see setup_env.sh). Takes a few minutes on two CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh

if [[ $# -gt 0 && "$1" != -* ]]; then
  config="$1"; shift
  exec headstart reproduce "$config" "$@"
fi

data="${HEADSTART_OUT:-out/sample}"
runs="${HEADSTART_RUNS:-runs/sample}"
image_size=128

# Six emoji categories (data/sample/category.csv; the man/woman task is data/sample/gender.csv,
# harder: matched pairs differ in a few pixels). Split grouped by emoji.
headstart ingest --source data/sample/category.csv --out "$data/images" --image-size "$image_size" \
  --label-column category --group-column group --splits train=60,val=20,test=20 "$@"
# Real ImageNet weights (shipped with the package) and the same architectures at random init,
# so the leaderboard shows what pretrained features buy.
headstart extract --images "$data/images" --out "$data/features" --backbones mobilenet \
  --weights imagenet "$@"
headstart extract --images "$data/images" --out "$data/features" --backbones mobilenet,mobilenet_v2 \
  --weights none "$@"
# The conv head (5.8 M parameters on these maps) is left out to keep this run to minutes on a
# CPU; add it with --heads linear,mlp,gap_dense,conv.
headstart compare --features "$data/features" --heads linear,mlp,gap_dense --seeds 3 --epochs 15 \
  --out "$runs/compare"
echo "leaderboard: $runs/compare/leaderboard.md   report: $runs/compare/report.html"
