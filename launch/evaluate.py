"""Evaluate checkpoints on the test sets of a config: Recall@N per dataset, split and condition.

    torchrun --nproc_per_node 2 launch/evaluate.py --config configs/demo.yaml \
        --checkpoint runs/demo/checkpoints/generation02_final.pt [--pca FILE] [--out results.json]

Test splits come from ``data.shards`` and the extra shard sets of ``data.test_shards``
(``--sets`` overrides ``data.test_sets``). ``--checkpoint`` takes several files or globs (e.g. every checkpoint of the last generation);
each gets its own table. OpenIBL checkpoints (VGG16 + NetVLAD) are accepted too. Training
checkpoints saved at the start of a generation hold no network; they are skipped with a warning.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from sfrs_dist import distributed as du
from sfrs_dist.config import ConfigError, load_config_for_launch
from sfrs_dist.data.test_sets import group_by_manifest, locate_splits
from sfrs_dist.device_check import DeviceUnusable, resolve_device
from sfrs_dist.evaluation.checkpoints import NoNetworkError, load_for_eval
from sfrs_dist.evaluation.pca import PCAWhitening
from sfrs_dist.evaluation.recall import format_recall_table
from sfrs_dist.evaluation.runner import evaluate_splits
from sfrs_dist.logging_utils import setup_logging
from sfrs_dist.precision import log_choice, resolve_config

log = logging.getLogger("evaluate")


def expand(patterns: List[str]) -> List[str]:
    out: List[str] = []
    for p in patterns:
        hits = sorted(glob.glob(p))
        if not hits:
            raise FileNotFoundError(f"no checkpoint matches {p}")
        out += hits
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint file(s) or glob(s)")
    p.add_argument("--pca", default=None, help="PCA-whitening HDF5 (U, lams, mu, Utmu) applied before search")
    p.add_argument("--sets", nargs="*", default=None, help="splits to evaluate (default: data.test_sets)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: <run.out_dir>/eval.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    cfg = load_config_for_launch(args.config, args.overrides)
    if cfg is None:
        return 2
    try:
        device = resolve_device(cfg.run.device, du.get_local_rank())
        ckpts = expand(args.checkpoint)
        located = locate_splits(cfg.data, args.sets or cfg.data.test_sets)
    except (FileNotFoundError, ConfigError, DeviceUnusable) as exc:
        if du.launch_rank() == 0:
            print(f"{'device error' if isinstance(exc, DeviceUnusable) else 'error'}: {exc}", file=sys.stderr)
        return 2
    info = du.init_distributed(timeout_s=cfg.run.dist_timeout_s, device=device)
    setup_logging()
    cfg, precision = resolve_config(cfg, info.device)  # eval.bf16 auto
    log_choice(precision)
    try:
        pca = PCAWhitening.load(args.pca) if args.pca else None
        results = {}
        for ck in ckpts:
            try:
                net = load_for_eval(cfg, Path(ck), info.device)
            except NoNetworkError as exc:
                log.warning("skipped: %s", exc)
                continue
            tables = {}
            for manifest, group in group_by_manifest(located):
                tables.update(evaluate_splits(net, net.output_dim, manifest, group, cfg.data, info.device,
                                              cfg.eval.recall_ns, pca=pca, bf16=cfg.eval.bf16,
                                              bf16_search=cfg.eval.bf16_search))
            results[ck] = {sid: {"recall": {c: {str(n): v for n, v in row.items()} for c, row in t.items()},
                                 "queries": counts} for sid, (t, counts) in tables.items()}
            if du.is_main_process():
                for sid, (t, counts) in tables.items():
                    print(f"\n{ck} :: {sid}\n{format_recall_table(t, counts)}")
        if not results:
            log.error("none of the %d checkpoint(s) holds a network", len(ckpts))
            return 1
        if du.is_main_process():
            out = Path(args.out or Path(cfg.run.out_dir) / "eval.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=2))
            os.replace(tmp, out)
            print(f"\nresults written to {out}")
    finally:
        du.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
