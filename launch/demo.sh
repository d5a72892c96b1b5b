#!/usr/bin/env bash
# README command 1: install, generate the demo synthetic city, build and verify its shards,
# train SFRS (generation 0 = SARE baseline, then 2 SFRS generations) on 2 CPU processes,
# evaluate every generation on the Pittsburgh-style test split and the Tokyo-style
# day/sunset/night queries, and print the recall table. Rerunning resumes where it stopped.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
DATA="${SFRS_DEMO_DATA:-data/synthetic-demo}"
SHARDS="${SFRS_DEMO_SHARDS:-shards/synthetic-demo}"
START=$(date +%s)

if [ ! -f "$DATA/synthetic_summary.json" ]; then
    python launch/make_synthetic.py --out "$DATA" --preset demo --seed 0 --workers 2
fi
python launch/build_shards.py --dataset synthetic --root "$DATA" --out "$SHARDS" --shard-size 200 --workers 2
python launch/build_shards.py --out "$SHARDS" --verify
torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/demo.yaml \
    --set data.shards="$SHARDS" "$@"
echo "demo finished in $(( $(date +%s) - START )) s"
