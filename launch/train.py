"""Train SFRS: ``torchrun [--nnodes N --nproc_per_node G ...] launch/train.py --config FILE [--set a.b=v ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from sfrs_dist import distributed as du
from sfrs_dist.config import ConfigError, check_resume, load_config_for_launch
from sfrs_dist.data.test_sets import locate_splits
from sfrs_dist.device_check import DeviceUnusable, resolve_device
from sfrs_dist.evaluation.paper_table import paper_table
from sfrs_dist.evaluation.protocols import protocol_note
from sfrs_dist.logging_utils import setup_logging
from sfrs_dist.precision import apply_choice, log_choice, resolve_config, saved_run_config
from sfrs_dist.tracking import default_tracking_uri
from sfrs_dist.training.checkpoint import NoLoadableCheckpoint, latest_checkpoint
from sfrs_dist.training.preemption import STOP_EXIT_CODE, Stopped, StopRequest, write_stop_record
from sfrs_dist.training.report import generation_table
from sfrs_dist.training.trainer import Trainer
from sfrs_dist.training.watchdog import HungRank

log = logging.getLogger("train")


def suite_table(cfg, trainer: Trainer, history):
    """One row per generation (and the untrained / selected networks), columns test set x R@1/5/10."""
    rows = {"untrained": trainer.untrained.get("test", {})} if trainer.untrained else {}
    rows.update({f"generation {g}": history[g]["test"] for g in sorted(history) if "test" in history[g]})
    if trainer.selected:
        rows["selected"] = trainer.selected["test"]
    notes = {sid: protocol_note(m.split_data(sid), cfg.data.nordland_frames) for sid, m in trainer.test_sets.items()}
    return paper_table(rows, [n for n in (1, 5, 10) if n in cfg.eval.recall_ns], notes)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="YAML run file (states only what differs from defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    args = p.parse_args(argv)
    cfg = load_config_for_launch(args.config, args.overrides)  # validated before any work
    if cfg is None:
        return 2
    try:  # before any process group: every rank stops with one message
        device = resolve_device(cfg.run.device, du.get_local_rank())
    except DeviceUnusable as exc:
        if du.launch_rank() == 0:
            print(f"device error: {exc}", file=sys.stderr)
        return 2
    try:
        has_checkpoints = latest_checkpoint(Path(cfg.run.out_dir) / "checkpoints") is not None
        # 'auto' precision: a resumed run keeps its own, a new one follows the hardware
        cfg, precision = resolve_config(cfg, device,
                                        saved=saved_run_config(cfg, cfg.run.out_dir, has_checkpoints))
        check_resume(cfg, cfg.run.out_dir, has_checkpoints)
        locate_splits(cfg.data, cfg.data.test_sets)
    except ConfigError as exc:
        if du.launch_rank() == 0:
            print(f"config error: {exc}", file=sys.stderr)
        return 2
    StopRequest.install(cfg.run.stop_grace_s)  # from here SIGTERM/SIGUSR1 stop the job cleanly
    info = du.init_distributed(timeout_s=cfg.run.dist_timeout_s, device=device)
    setup_logging()
    log.info("command: %s", " ".join(sys.argv))
    log.info("world size %d, backend %s, device %s", info.world_size, info.backend, info.device)
    choices = du.all_gather_object(precision)
    if any(c != choices[0] for c in choices):
        log.warning("ranks resolved precision differently (%s); every rank uses rank 0's", sorted({str(c) for c in choices}))
        precision = choices[0]
        cfg = apply_choice(cfg, precision)
    log_choice(precision)
    try:
        trainer = Trainer(cfg, info.device, precision=precision)
        try:
            history = trainer.run()
        except Stopped as stop:
            log.warning("%s; exit code %d: run the same command to continue", stop, STOP_EXIT_CODE)
            if du.is_main_process():
                write_stop_record(stop)
            return STOP_EXIT_CODE
        except (HungRank, NoLoadableCheckpoint) as exc:  # one line each, not a traceback per rank
            if du.is_main_process() or isinstance(exc, HungRank):
                log.error("%s", exc)
            return 1
        if du.is_main_process():
            print("\nRecall@N on the test sets, per generation (generation 0 = SARE baseline):")
            print(generation_table(history, [n for n in cfg.eval.recall_ns if n <= 10], trainer.selected,
                                   trainer.untrained))
            print("\nThe same, in the papers' shape (overall Recall@N, percent):\n")
            print(suite_table(cfg, trainer, history).to_markdown())
            uri = cfg.tracking.uri or default_tracking_uri(Path(cfg.run.out_dir))
            print(f"\nCompare generations in MLflow:  mlflow ui --backend-store-uri {uri}  "
                  "(then open http://127.0.0.1:5000)")
    finally:
        du.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
