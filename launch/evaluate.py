"""Evaluate checkpoints on the test sets of a config: Recall@N per dataset, split and condition.

    torchrun --nproc_per_node 2 launch/evaluate.py --config configs/demo.yaml \
        --checkpoint runs/demo/checkpoints/generation02_final.pt [--pca FILE] [--out results.json] \
        [--save-descriptors DIR]

Test splits come from ``data.shards`` and the extra shard sets of ``data.test_shards``
(``--sets`` overrides ``data.test_sets``). ``--checkpoint`` takes several files or globs (e.g. every checkpoint of the last generation);
each gets its own table. OpenIBL checkpoints (VGG16 + NetVLAD) are accepted too. Training
checkpoints saved at the start of a generation hold no network; they are skipped with a warning.

Besides the per-checkpoint tables (``--out``, JSON), one table in the papers' shape is printed
and saved beside it (``<out>_table.json`` and ``<out>_table.md``): one row per checkpoint,
columns test split x R@1/5/10, each split's protocol stated below it. With
``data.test_sets_present_only`` (configs/vpr_suite.yaml) the listed sets that are not built are
skipped. ``--save-descriptors DIR`` writes every split's final descriptors (PCA-whitened with
``--pca``), UTMs and file names to ``DIR/<checkpoint>/<split>/`` (sfrs_dist/evaluation/export.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from sfrs_dist import distributed as du
from sfrs_dist.config import ConfigError, load_config_for_launch
from sfrs_dist.data.test_sets import group_by_manifest, locate_splits
from sfrs_dist.device_check import DeviceUnusable, resolve_device
from sfrs_dist.evaluation.checkpoints import NoNetworkError, load_for_eval
from sfrs_dist.evaluation.export import save_split_descriptors
from sfrs_dist.evaluation.paper_table import paper_table
from sfrs_dist.evaluation.pca import PCAWhitening
from sfrs_dist.evaluation.protocols import protocol_note
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


def row_labels(ckpts: List[str]) -> Dict[str, str]:
    """Checkpoint -> table row label: the file stem, or the path where two stems coincide."""
    stems = [Path(c).name.split(".")[0] for c in ckpts]
    return {c: (s if stems.count(s) == 1 else c) for c, s in zip(ckpts, stems)}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint file(s) or glob(s)")
    p.add_argument("--pca", default=None, help="PCA-whitening HDF5 (U, lams, mu, Utmu) applied before search")
    p.add_argument("--sets", nargs="*", default=None, help="splits to evaluate (default: data.test_sets)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: <run.out_dir>/eval.json)")
    p.add_argument("--save-descriptors", default=None, metavar="DIR",
                   help="write each split's final descriptors, UTMs and names under DIR/<checkpoint>/<split>/")
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
        results, rows = {}, {}
        labels = row_labels(ckpts)
        for ck in ckpts:
            try:
                net = load_for_eval(cfg, Path(ck), info.device)
            except NoNetworkError as exc:
                log.warning("skipped: %s", exc)
                continue
            tables = {}
            for manifest, group in group_by_manifest(located):
                save = None
                if args.save_descriptors:
                    def save(sid, db, q, manifest=manifest, ck=ck):
                        where = save_split_descriptors(Path(args.save_descriptors) / labels[ck], manifest, sid, db, q)
                        log.info("%s: descriptors written to %s", sid, where)
                tables.update(evaluate_splits(net, net.output_dim, manifest, group, cfg.data, info.device,
                                              cfg.eval.recall_ns, pca=pca, bf16=cfg.eval.bf16, on_descriptors=save,
                                              bf16_search=cfg.eval.bf16_search))
            tables = {sid: tables[sid] for sid in located}  # the listed order
            rows[labels[ck]] = tables
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
            write_atomic(out, json.dumps(results, indent=2))
            notes = {sid: protocol_note(m.split_data(sid), cfg.data.nordland_frames) for sid, m in located.items()}
            table = paper_table(rows, [n for n in (1, 5, 10) if n in cfg.eval.recall_ns], notes)
            stem = out.with_suffix("")
            write_atomic(stem.with_name(stem.name + "_table.json"), json.dumps(table.to_json(), indent=2))
            write_atomic(stem.with_name(stem.name + "_table.md"), table.to_markdown())
            print(f"\n{table.to_markdown()}")
            print(f"results written to {out}, the table to {stem}_table.json and {stem}_table.md")
    finally:
        du.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
