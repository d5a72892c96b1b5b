"""The SFRS training loop: generations -> epochs -> cache subsets -> optimiser steps.

Per generation the student is re-initialised (backbone weights + cached NetVLAD init);
from generation 1 on the previous generation's final network is the teacher, whose soft
labels come from a cached teacher pass (``train.teacher: cached``) or from the teacher run on
each batch's own images (``online``, the reference's way). Per cache subset, descriptors of every training
query and database image are re-extracted across ranks and tuples are mined; each rank then
trains on its share of the subset's tuples. A checkpoint is written after every subset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import distributed as du
from ..config import Config, save_config
from ..data.manifest import Manifest
from ..data.records import record_keys
from ..data.test_sets import group_by_manifest, locate_splits
from ..data.transforms import DeviceColorJitter
from ..evaluation.checkpoints import load_for_eval
from ..evaluation.pca_fit import fit_pca_sharded
from ..evaluation.runner import evaluate_splits, flat_metrics, render_examples
from ..extraction.passes import eval_mode, extract_group_local
from ..mining import (
    COLLAPSE_SIMILARITY,
    NegativeCache,
    ShardedItems,
    make_negative_sampler,
    mine_subset,
)
from ..models import weights_info
from ..precision import PrecisionChoice, is_resolved, log_choice, resolve_config
from ..progress import Progress
from ..teacher import load_network, run_teacher_pass
from ..tracking import Tracker, build_tracker, git_commit
from .checkpoint import (
    TrainState,
    atomic_torch_save,
    checkpoint_name,
    load_resume,
    prune_subset_checkpoints,
)
from .engine import autocast_context, build_engine, lr_at
from .model_init import build_student
from .preemption import Stopped, StopRequest, check_position, position_state, set_rng_state
from .step_loss import cached_soft_targets, online_soft_targets, step_loss
from .tuples_data import TupleImages, TupleLoader
from .watchdog import Watchdog, watched

log = logging.getLogger(__name__)


@dataclass
class TrainSplit:
    """Ground truth of the training split, from the manifest."""

    sid: str
    q_keys: List[str]
    db_keys: List[str]
    train_pos: List[np.ndarray]
    potential: List[np.ndarray]
    queries: np.ndarray

    @classmethod
    def from_manifest(cls, manifest: Manifest, sid: str) -> "TrainSplit":
        split = manifest.split_data(sid)
        train_pos = split.training_positives()
        queries = np.asarray([i for i, p in enumerate(train_pos) if len(p) > 0], dtype=np.int64)
        if queries.size == 0:
            raise ValueError(f"split {sid}: no training query has a database image within "
                             f"{np.sqrt(split.nontriv_pos_dist_sq_thr):.1f} m")
        return cls(sid, record_keys(split.queries), record_keys(split.database), train_pos,
                   split.potential_positives(), queries)


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (generation, epoch, subset, rank...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class Trainer:
    """Runs a whole job; every rank builds one and calls ``run()``."""

    def __init__(self, cfg: Config, device: torch.device, precision: Optional[PrecisionChoice] = None) -> None:
        if precision is None or not is_resolved(cfg):  # launch/train.py resolves before the resume check
            cfg, precision = resolve_config(cfg, device)
            log_choice(precision)
        self.cfg = cfg
        self.precision = precision
        self.device = device
        self.rank, self.world = du.get_rank(), du.get_world_size()
        self.run_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.cache_dir = self.run_dir / "cache"
        self.manifest = Manifest.load(Path(cfg.data.shards))
        self.train = TrainSplit.from_manifest(self.manifest, cfg.data.train_set)
        self.test_sets = locate_splits(cfg.data, cfg.data.test_sets)  # split id -> its shard set
        self.state = TrainState()
        self.neg_sampler = make_negative_sampler(len(self.train.db_keys), self.train.potential)
        self.tracker: Tracker = build_tracker(self.rank, cfg.tracking.uri, cfg.tracking.experiment, self.run_dir)
        self.history: Dict[int, Dict] = {}
        self.selected: Dict = {}
        self.untrained: Dict = {}
        # the reference keeps each query's last hard negatives across generations too
        self.neg_cache = NegativeCache(len(self.train.q_keys), cfg.mining.num_negatives)
        self.resume_path: Optional[Path] = None
        self._collapse_warned: set = set()
        self.stop = StopRequest.install(cfg.run.stop_grace_s)  # SIGTERM/SIGUSR1: stop at a step boundary
        self.watchdog = Watchdog(  # names the phase and the missing rank when a collective fails
            lambda: "generation {generation} epoch {epoch} subset {subset} step {step}".format(**asdict(self.state)),
            record=self.run_dir / "stages" / f"rank{self.rank}.jsonl")  # per phase: seconds, peak memory
        self.position: Optional[Dict] = None  # where a stop inside a cache subset left off
        self.last_saved: Optional[Path] = None

    # ------------------------------------------------------------------ job
    def run(self) -> Dict[int, Dict]:
        cfg = self.cfg
        if du.is_main_process():
            save_config(cfg, self.run_dir / "config.yaml")
        resume, ckpt = load_resume(cfg.run.resume, self.ckpt_dir)
        self.resume_path = self.last_saved = resume
        if ckpt:
            self.position = ckpt.get("position")
            if self.position is not None:
                check_position(self.position, resume)
            self.state.load_state_dict(ckpt["state"])
            self.tracker.load_state_dict(ckpt.get("tracker", {}))
            self.history = ckpt.get("history", {})
            self.selected = ckpt.get("selected", {})
            self.untrained = ckpt.get("untrained", {})
            if "negatives" in ckpt:
                self.neg_cache = NegativeCache.from_state_dict(ckpt["negatives"])
            log.info("resuming from %s at %s", resume, self.state)
        m = cfg.model
        info = weights_info(m.backbone, m.weights, m.input_norm)
        weights = {"model.weights_source": info["weights_source"], "model.input_norm_resolved": info["input_norm"]}
        log.info("backbone %s: weights %s; input %s", m.backbone, info["weights_source"], info["input_norm"])
        self.tracker.start_job(cfg.tracking.run_name or self.run_dir.name,
                               {**cfg.flat(), **self.precision.params(), **weights},
                               {"git_commit": git_commit(), "world_size": str(self.world)})
        self.tracker.log_artifact(self.run_dir / "config.yaml")
        try:
            while self.state.generation < cfg.train.generations:
                self._stop_if_asked()
                self._generation(self.state.generation, ckpt)
                ckpt = None
            if not self.selected:
                self._report_selected()
            self.tracker.finish("FINISHED")
        except Stopped:
            self.tracker.finish("KILLED")
            raise
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        return self.history

    # ----------------------------------------------------------- generation
    def _generation(self, gen: int, ckpt: Optional[Dict]) -> None:
        cfg = self.cfg
        with self.watchdog.phase("setup"):  # backbone weights and the NetVLAD init (k-means)
            net = build_student(cfg, self.manifest, self.train.sid, self.cache_dir, self.device)
        if gen == 0 and cfg.eval.test_untrained and not self.untrained and ckpt is None:
            self._report_untrained(net)
        teacher, teacher_key, teacher_s = None, "", 0.0
        teacher_ckpt = self.final_path(gen - 1)
        if gen >= 1 and cfg.train.teacher == "online":  # forwarded in every step, no cache written
            teacher = load_network(cfg, teacher_ckpt, self.device)
            teacher_key = f"online {teacher_ckpt.name}"
            log.info("generation %d: online teacher %s (run on every batch, eval mode)", gen, teacher_ckpt)
        elif gen >= 1:
            t0 = time.time()
            with self.watchdog.phase("teacher pass"):
                teacher, teacher_key = run_teacher_pass(cfg, self.manifest, self.train.train_pos, teacher_ckpt,
                                                        self.cache_dir, self.device)
            teacher_s = time.time() - t0
        engine = build_engine(cfg.train.engine, net, self.device, cfg.train.lr, cfg.train.momentum,
                              cfg.train.weight_decay, cfg.train.precision, cfg.train.zero_stage,
                              cfg.train.batch_size)
        neg_cache = self.neg_cache
        if ckpt is not None and "model" in ckpt:
            engine.load_checkpoint_state(ckpt, self.resume_path)
        self.tracker.start_generation(gen, cfg.flat(), {"teacher_checkpoint": teacher_key or "none",
                                                        "git_commit": git_commit()})
        if teacher_s:
            self.tracker.log_metrics({"teacher_pass_s": teacher_s}, step=self.state.step)
        epochs = cfg.train.gen0_epochs if gen == 0 else cfg.train.epochs
        while self.state.epoch < epochs:
            self._stop_if_asked()
            self._epoch(gen, self.state.epoch, engine, neg_cache, teacher)
            self.state.epoch += 1
            self.state.subset = self.state.epoch_step = 0
            self._save(engine, neg_cache)
        self._finish_generation(gen, engine)

    def _finish_generation(self, gen: int, engine) -> None:
        cfg = self.cfg
        final = self.final_path(gen)
        model = engine.fp32_state_dict()  # float32 weights; a collective under DeepSpeed
        if du.is_main_process():
            atomic_torch_save({"model": model, "generation": gen, "config": cfg.to_dict()}, final)
        du.barrier()
        tables, pca_path = self._test(engine.eval_network(), gen)
        self.history.setdefault(gen, {}).update(test=tables, steps=self.state.step)
        self.tracker.log_metrics(flat_metrics(tables), step=self.state.step)
        self.tracker.log_artifact(self.best_path(gen), "checkpoints")
        if pca_path is not None:
            self.tracker.log_artifact(pca_path, "pca")
        self.tracker.end_generation()
        self.state.generation = gen + 1
        self.state.epoch = self.state.subset = self.state.step = self.state.epoch_step = 0
        self._save(None, self.neg_cache)

    def _keep_best(self, engine, gen: int, epoch: int, val: Dict) -> None:
        """Save the generation's best network by validation Recall@5 (the reference's choice)."""
        sid = self.cfg.data.val_set
        if not val or sid not in val:
            return
        r5 = val[sid][0]["all"].get(5, val[sid][0]["all"].get(min(val[sid][0]["all"])))
        best = self.history[gen].get("best_val_r5", -1.0)
        if r5 > best:
            self.history[gen]["best_val_r5"] = r5
            self.history[gen]["best_epoch"] = epoch
            model = engine.fp32_state_dict()  # every rank: a collective under DeepSpeed
            if du.is_main_process():
                atomic_torch_save({"model": model, "generation": gen,
                                   "val_recall5": r5, "config": self.cfg.to_dict()}, self.best_path(gen))

    def best_path(self, gen: int) -> Path:
        return self.ckpt_dir / f"generation{gen:02d}_best.pt"

    def final_path(self, gen: int) -> Path:
        return self.ckpt_dir / f"generation{gen:02d}_final.pt"

    # ---------------------------------------------------------------- epoch
    def _epoch(self, gen: int, epoch: int, engine, neg_cache, teacher) -> None:
        cfg = self.cfg
        engine.set_lr(lr_at(epoch, cfg.train.lr, cfg.train.lr_step, cfg.train.lr_gamma))
        order = np.random.default_rng(seed_for(cfg.train.seed, gen, epoch)).permutation(self.train.queries)
        subsets = [order[i:i + cfg.mining.cache_subset_size] for i in range(0, len(order), cfg.mining.cache_subset_size)]
        t_epoch = time.time()
        losses: List[float] = []
        loader = self._tuple_loader()  # one per epoch: its workers start with the first subset
        while self.state.subset < len(subsets):
            s = self.state.subset
            self._stop_if_asked()
            if self.position is not None:  # stopped inside this subset: its tuples, no refresh
                tuples, timings, losses = self.position["tuples"], {}, list(self.position["epoch_losses"])
            else:
                tuples, timings = self._refresh(engine, gen, epoch, s, subsets[s], neg_cache)
            losses += self._train_subset(engine, loader, gen, epoch, s, tuples, teacher, neg_cache, losses)
            self.tracker.log_metrics(timings, step=self.state.step)
            self.state.subset += 1
            self._save(engine, neg_cache)
        loader.close()
        val = self._validate(engine.eval_network())
        if val:
            self.tracker.log_metrics({**flat_metrics(val), "epoch": epoch}, step=self.state.step)
        self.history.setdefault(gen, {}).setdefault("epochs", []).append({"epoch": epoch, "val": val})
        self._keep_best(engine, gen, epoch, val)
        r = val.get(cfg.data.val_set, ({}, {}))[0].get("all", {}) if val else {}
        log.info("generation %d epoch %d: %d steps, loss %.4f, %.1f s%s", gen, epoch, len(losses),
                 float(np.mean(losses)) if losses else float("nan"), time.time() - t_epoch,
                 "".join(f", val R@{n} {100 * v:.1f}" for n, v in r.items()))

    @watched("validation")
    def _validate(self, net) -> Dict:
        """Recall on ``data.val_set`` (no PCA), or ``{}`` without a validation split."""
        cfg = self.cfg
        if not (cfg.data.val_set and cfg.data.val_set in self.manifest.splits):
            return {}
        with eval_mode(net):
            return evaluate_splits(net, net.output_dim, self.manifest, [cfg.data.val_set], cfg.data, self.device,
                                   cfg.eval.recall_ns, bf16=cfg.eval.bf16, bf16_search=cfg.eval.bf16_search)

    # --------------------------------------------------------------- mining
    @watched("refresh")
    def _refresh(self, engine, gen: int, epoch: int, s: int, subset: np.ndarray, neg_cache):
        cfg = self.cfg
        t0 = time.time()
        net = engine.eval_network()  # float32 weights (DeepSpeed bf16/fp16 casts the module's)
        with eval_mode(net):  # each rank keeps the descriptors it extracted (item ids: queries, then database)
            q_ids, q_rows = extract_group_local(net, net.output_dim, self.manifest, self.train.sid, "q", cfg.data,
                                                self.device, bf16=cfg.eval.bf16)
            db_ids, db_rows = extract_group_local(net, net.output_dim, self.manifest, self.train.sid, "db", cfg.data,
                                                  self.device, bf16=cfg.eval.bf16)
        t1 = time.time()
        nq = len(self.train.q_keys)
        items = ShardedItems(np.concatenate([q_ids, nq + db_ids]), np.concatenate([q_rows, db_rows]),
                             nq + len(self.train.db_keys), device=self.device)  # bf16 search on the device
        del q_rows, db_rows
        rng = np.random.default_rng(seed_for(cfg.train.seed, gen, epoch, s, 1))
        res = mine_subset(subset, items, nq, self.train.train_pos, self.neg_sampler, neg_cache, gen, rng, cfg.mining)
        tuples = res.tuples
        out = {"extract_s": t1 - t0, "mining_s": time.time() - t1}
        out["desc_mean_sim"] = items.mean_pair_similarity(  # random pairs of database images
            np.random.default_rng(seed_for(cfg.train.seed, gen, epoch, s, 3)), lo=nq)
        if out["desc_mean_sim"] > COLLAPSE_SIMILARITY and gen not in self._collapse_warned:
            self._collapse_warned.add(gen)
            log.warning("generation %d: descriptors are collapsing (mean cosine similarity %.3f between random "
                        "database images, above %.2f); see docs/troubleshooting.md", gen, out["desc_mean_sim"],
                        COLLAPSE_SIMILARITY)
        out.update({f"mining_{k}": v for k, v in asdict(res.timings).items()})
        return tuples, out

    # ------------------------------------------------------------- training
    def _tuple_loader(self) -> TupleLoader:
        """The loader of tuple images for an epoch's subsets (``data.train_workers`` workers)."""
        d = self.cfg.data
        ds = TupleImages(d.shards, self.train.q_keys, self.train.db_keys, d.image_size, d.color_jitter,
                         jitter_on_device=d.jitter_on_device)
        workers = d.num_workers if d.train_workers is None else d.train_workers
        return TupleLoader(ds, self.cfg.train.batch_size, workers, pin_memory=self.device.type == "cuda")

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device, copied asynchronously (pinned first on CUDA)."""
        if self.device.type == "cuda" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    @watched("training")
    def _train_subset(self, engine, loader: TupleLoader, gen: int, epoch: int, s: int, tuples,
                      teacher, neg_cache=None, epoch_losses: Sequence[float] = ()) -> List[float]:
        cfg = self.cfg
        per_step = self.world * cfg.train.batch_size
        start = self.position["subset_step"] if self.position is not None else 0  # steps done before a stop
        steps = len(tuples) // per_step
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, max(0, cfg.train.max_steps_per_epoch - (self.state.epoch_step - start)))
        mine = [tuples[(i * self.world + self.rank) * cfg.train.batch_size + b]
                for i in range(steps) for b in range(cfg.train.batch_size)]
        torch.manual_seed(seed_for(cfg.train.seed, gen, epoch, s, 2, self.rank))
        if self.position is not None:
            set_rng_state(self.position["rng"][self.rank])
            log.info("resuming generation %d epoch %d subset %d at step %d of %d: its mined tuples restored, "
                     "no refresh", gen, epoch, s, start, steps)
            self.position = None
        # no batches (a max_steps_per_epoch cap reached): no worker started for nothing
        seed = seed_for(cfg.train.seed, gen, epoch, s, 4, self.rank)
        batches = loader.subset(mine, seed, start * cfg.train.batch_size) if start < steps else iter(())
        jitter = DeviceColorJitter(cfg.data.color_jitter) if cfg.data.jitter_on_device else None
        engine.train(True)
        tau = cfg.temperature(gen)
        tau0 = cfg.loss.temperatures[0]
        losses: List[torch.Tensor] = []  # on the device: read at log steps and at the end only (no per-step sync)
        bar = Progress(steps - start, f"train generation {gen} epoch {epoch} subset {s}", unit="step")
        t0 = time.time()
        for done, batch in enumerate(batches, start + 1):
            images = self._to_device(batch["images"])
            if jitter is not None:
                images = jitter(images)
            loss, parts = self._loss(engine, images, batch["tuples"], gen, tau0, tau, teacher)
            engine.backward_step(loss)
            self.state.step += 1
            self.state.epoch_step += 1
            self.state.total_steps += 1
            losses.append(loss.detach())
            if self.state.step % cfg.train.log_every == 0:
                elapsed = time.time() - t0
                last = float(losses[-1])
                self.tracker.log_metrics({**{k: float(v) for k, v in parts.items()}, "loss": last,
                                          "lr": engine.optimizer.param_groups[0]["lr"],
                                          "tuples_per_s": len(losses) * per_step / max(elapsed, 1e-9)},
                                         step=self.state.step)
                bar.set_postfix(loss=f"{last:.4f}")
            bar.update()
            self.watchdog.beat()
            if done < steps and self.stop.agreed():  # the last step's stop comes after the subset's checkpoint
                bar.close()
                done_losses = list(epoch_losses) + torch.stack(losses).tolist()
                raise self._stop_inside_subset(engine, neg_cache, tuples, done, steps, done_losses)
        out = torch.stack(losses).tolist() if losses else []
        if out:
            bar.set_postfix(loss=f"{out[-1]:.4f}")
        bar.close()
        return out

    def _loss(self, engine, images: torch.Tensor, tuples: List[Dict], gen: int, tau0: float, tau: float, teacher):
        """The loss of one batch (``images`` on the device, ``tuples`` their layout) and its
        parts, as device tensors: nothing here waits for the device."""
        regions = engine.forward(images, regions=True)  # (N, 9, D)
        soft = None
        if gen >= 1 and self.cfg.train.teacher == "online":
            soft = online_soft_targets(teacher, images, tuples,
                                       autocast=lambda: autocast_context(engine.precision, self.device))
        elif gen >= 1:  # the whole batch's soft labels: one host -> device copy each
            soft_t, mask = cached_soft_targets(teacher, tuples)
            soft = (self._to_device(torch.from_numpy(soft_t)), self._to_device(torch.from_numpy(mask)))
        return step_loss(regions, tuples, gen, self.cfg.loss, tau0, tau, soft)

    # ------------------------------------------------------------ test/ckpt
    @watched("test")
    def _test(self, net, gen: int, tag: str = ""):
        """PCA fitted on the network, then every test set; ``tag`` names the files (default: gen)."""
        cfg = self.cfg
        sids = list(self.test_sets)
        tag = tag or f"generation{gen:02d}"
        pca, pca_path = None, None
        with eval_mode(net):
            if cfg.eval.pca_dim and cfg.eval.pca_dim < net.output_dim:
                # as the reference: images drawn at random from training queries and database; each
                # rank keeps its share, only the sampled rows travel (to rank 0, which fits on its device)
                (q_ids, q_rows), (db_ids, db_rows) = [
                    extract_group_local(net, net.output_dim, self.manifest, self.train.sid, role, cfg.data,
                                        self.device, bf16=cfg.eval.bf16) for role in ("q", "db")]
                nq = len(self.train.q_keys)
                pca = fit_pca_sharded(np.concatenate([q_ids, nq + db_ids]), np.concatenate([q_rows, db_rows]),
                                      nq + len(self.train.db_keys), cfg.eval.pca_dim, cfg.eval.pca_samples,
                                      cfg.train.seed, self.device)  # on every rank: each whitens its share
                del q_rows, db_rows
                pca_path = self.ckpt_dir / f"{tag}_pca.h5"
                if du.is_main_process():
                    pca_path.parent.mkdir(parents=True, exist_ok=True)
                    pca.save(str(pca_path))
            examples_dir = self.run_dir / "examples" / tag

            def draw(sid, topk):
                if sid == sids[0]:
                    for png in render_examples(self.test_sets[sid], sid, topk, examples_dir):
                        self.tracker.log_artifact(Path(png), "retrievals", parent=not tag.startswith("generation"))

            tables = {}
            for manifest, group in group_by_manifest(self.test_sets):
                tables.update(evaluate_splits(net, net.output_dim, manifest, group, cfg.data, self.device,
                                              cfg.eval.recall_ns, pca=pca, bf16=cfg.eval.bf16,
                                              on_topk=draw, bf16_search=cfg.eval.bf16_search))
        return tables, pca_path

    def _report_untrained(self, net) -> None:
        """The off-the-shelf baseline: backbone weights + NetVLAD init, no training."""
        tables, _ = self._test(net, 0, tag="untrained")
        val = self._validate(net)
        self.untrained = {"test": tables, "val": val}
        self.tracker.log_metrics({f"untrained/{k}": v for k, v in flat_metrics({**tables, **val}).items()},
                                 step=0, parent=True)

    def _report_selected(self) -> None:
        """The reference's reported network: best validation Recall@5 over all generations and
        epochs, PCA fitted on it, tested on every test set; logged to the parent run."""
        scored = [(h["best_val_r5"], g) for g, h in self.history.items() if "best_val_r5" in h]
        if not scored:
            log.info("no validation split: no network selected by validation Recall@5")
            return
        r5, gen = max(scored, key=lambda t: (t[0], -t[1]))  # ties: the earlier generation
        epochs = self.cfg.train.gen0_epochs if gen == 0 else self.cfg.train.epochs
        if self.history[gen].get("best_epoch") == epochs - 1 and "test" in self.history[gen]:
            # the best network is that generation's final one, already tested (same PCA seed)
            tables = self.history[gen]["test"]
            pca_path = self.ckpt_dir / f"generation{gen:02d}_pca.h5"
            pca_path = pca_path if pca_path.is_file() else None
        else:
            net = load_for_eval(self.cfg, self.best_path(gen), self.device)
            tables, pca_path = self._test(net, gen, tag="selected")
        tied = sorted(g for v, g in scored if v == r5 and g != gen)
        if tied:
            log.info("selection decided by a tie: generations %s reach the same validation R@5 %.1f as generation %d",
                     tied, 100 * r5, gen)
        self.selected = {"generation": gen, "val_recall5": r5, "test": tables, "tied_with": tied}
        log.info("selected network (best validation R@5 %.1f): generation %d, %s", 100 * r5, gen,
                 self.best_path(gen).name)
        self.tracker.log_metrics({**{f"selected/{k}": v for k, v in flat_metrics(tables).items()},
                                  "selected/generation": gen, "selected/val_recall_5": 100 * r5,
                                  "selected/tied_generations": len(tied)},
                                 step=0, parent=True)
        if pca_path is not None:
            self.tracker.log_artifact(pca_path, "pca", parent=True)
        self._save(None, self.neg_cache)

    def _stop_if_asked(self) -> None:
        """At a boundary whose checkpoint is written: stop there if any rank received a stop signal."""
        if self.stop.agreed():
            raise self.stop.stopped(self.last_saved)

    def _stop_inside_subset(self, engine, neg_cache, tuples, done: int, steps: int, losses: List[float]) -> Stopped:
        """Save the position after step ``done`` of ``steps`` of the current subset; the ``Stopped`` to raise."""
        self._save(engine, neg_cache, position_state(tuples, done, steps, losses))
        return self.stop.stopped(self.last_saved)

    @watched("checkpoint")
    def _save(self, engine, neg_cache, position: Optional[Dict] = None) -> None:
        st = self.state
        payload = {
            "state": st.state_dict(),
            "tracker": self.tracker.state_dict(),
            "history": self.history,
            "config": self.cfg.to_dict(),
        }
        step = position["subset_step"] if position else 0
        path = self.ckpt_dir / checkpoint_name(st.generation, st.epoch, st.subset, step)
        if position:
            payload["position"] = position
        if neg_cache is not None:
            payload["negatives"] = neg_cache.state_dict()
        if self.selected:
            payload["selected"] = self.selected
        if self.untrained:
            payload["untrained"] = self.untrained
        if engine is not None:  # every rank: DeepSpeed writes each rank's ZeRO partition first
            payload.update(engine.checkpoint_state(path))
        # the tracker's run ids live on rank 0; it is also the only writer of the main file
        if du.is_main_process():
            atomic_torch_save(payload, path)
            prune_subset_checkpoints(self.ckpt_dir, path, keep_tag=payload.get("deepspeed_tag"))
        du.barrier()
        self.last_saved = path

