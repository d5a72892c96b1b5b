#!/usr/bin/env bash
# README command 1: installs, generates the demo synthetic city, builds and verifies its shards.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
DATA="${SFRS_DEMO_DATA:-data/synthetic-demo}"
SHARDS="${SFRS_DEMO_SHARDS:-shards/synthetic-demo}"
python launch/make_synthetic.py --out "$DATA" --preset demo --seed 0 --workers 2
python launch/build_shards.py --dataset synthetic --root "$DATA" --out "$SHARDS" --workers 2
python launch/build_shards.py --dataset synthetic --root "$DATA" --out "$SHARDS" --verify
