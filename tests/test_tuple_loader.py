"""The training-tuple loader: one per epoch with persistent workers fed through the sampler,
images independent of the worker count, colour jitter on the device; the training step keeps
losses on the device and still logs and returns every step's value."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from sfrs_dist.config import load_config
from sfrs_dist.data.manifest import Manifest
from sfrs_dist.data.shards import build_shards
from sfrs_dist.data.transforms import JITTER, DeviceColorJitter, train_resize, train_transform
from sfrs_dist.mining.tuples import TrainingTuple
from sfrs_dist.models import build_model
from sfrs_dist.teacher.cache import TeacherCache
from sfrs_dist.training.checkpoint import TrainState
from sfrs_dist.training.engine import build_engine
from sfrs_dist.training.preemption import StopRequest
from sfrs_dist.training.trainer import Trainer
from sfrs_dist.training.tuples_data import TupleImages, TupleLoader
from sfrs_dist.training.watchdog import Watchdog


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (several only contend on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy(tmp_path, make_jpeg_split):
    out = tmp_path / "shards"
    build_shards([make_jpeg_split("toy", "train", 12, 4, seed=1)], out, shard_size=4, progress=False)
    m = Manifest.load(out)
    return out, m.group_keys("toy_train_q"), m.group_keys("toy_train_db")


def _tuples(n: int, seed: int, negs: int = 3) -> List[TrainingTuple]:
    rng = np.random.default_rng(seed)
    return [TrainingTuple(int(rng.integers(4)), int(rng.integers(12)), rng.choice(12, negs, replace=False),
                          rng.choice(12, int(rng.integers(0, 3)), replace=False)) for _ in range(n)]


def _same(a: List[Dict], b: List[Dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["images"], y["images"]) and x["tuples"] == y["tuples"]
                                    for x, y in zip(a, b))


def test_persistent_workers_read_each_subsets_tuples(toy):
    shards, q_keys, db_keys = toy
    ds = TupleImages(shards, q_keys, db_keys, (16, 16), JITTER)
    first, second = _tuples(5, 0), _tuples(4, 1)
    with TupleLoader(ds, batch_size=2, workers=0) as inline:
        want1, want2 = list(inline.subset(first, seed=3)), list(inline.subset(second, seed=4))
    assert [len(b["tuples"]) for b in want1] == [2, 2, 1]
    t = first[0]
    assert want1[0]["images"].shape[0] == sum(2 + len(x.negatives) + len(x.difficult_positives) for x in first[:2])
    assert want1[0]["tuples"][0] == {"query": t.query, "num_negatives": 3, "difficult": list(t.difficult_positives)}
    with TupleLoader(ds, batch_size=2, workers=2) as loader:
        got1 = list(loader.subset(first, seed=3))
        workers = [w.pid for w in loader.loader._iterator._workers]
        got2 = list(loader.subset(second, seed=4))
        assert [w.pid for w in loader.loader._iterator._workers] == workers  # the same processes
        again = list(loader.subset(first, seed=5))
    assert _same(got1, want1) and _same(got2, want2)  # each subset's own tuples; jitter seeded per item
    assert not _same(again, want1)  # another seed, other jitter
    assert loader.loader._iterator is None  # closed: workers stopped


def test_device_jitter(toy):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    raw = train_resize(16, 16)(img)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 16, 16)
    # no jitter: the same tensor as the loader's transform
    torch.testing.assert_close(DeviceColorJitter((0, 0, 0, 0))(raw[None])[0], train_transform(16, 16, (0, 0, 0, 0))(img),
                               rtol=0, atol=1e-3)
    # brightness only, on a flat grey batch: one factor per image, each within [0.5, 1.5]
    grey = torch.full((6, 3, 4, 4), 100, dtype=torch.uint8)
    torch.manual_seed(0)
    out = DeviceColorJitter((0.5, 0, 0, 0))(grey)
    factors = ((out[:, 0] / 255 + 0.485) * 255 / 100).flatten(1)
    assert torch.allclose(factors, factors[:, :1], atol=1e-4)
    assert ((factors[:, 0] >= 0.5 - 1e-4) & (factors[:, 0] <= 1.5 + 1e-4)).all()
    assert len({round(float(f), 4) for f in factors[:, 0]}) == 6
    # the loader leaves the jitter to the device
    shards, q_keys, db_keys = toy
    ds = TupleImages(shards, q_keys, db_keys, (16, 16), JITTER, jitter_on_device=True)
    with TupleLoader(ds, batch_size=2, workers=0) as loader:
        batch = next(loader.subset(_tuples(2, 0), seed=0))
    assert batch["images"].dtype == torch.uint8
    assert DeviceColorJitter(JITTER)(batch["images"]).dtype == torch.float32


class _Recorder:
    def __init__(self) -> None:
        self.logged: List[Dict] = []

    def log_metrics(self, metrics: Dict, step: int) -> None:
        self.logged.append({"step": step, **metrics})


def _trainer(shards: Path, q_keys, db_keys, log_every: int, gen: int, jitter_on_device: bool = False):
    cfg = load_config(None, [f"data.shards={shards}", "data.image_size=[32, 32]", "data.train_workers=0",
                             f"data.jitter_on_device={str(jitter_on_device).lower()}", "train.batch_size=2",
                             f"train.log_every={log_every}", "model.backbone=smallcnn", "model.num_clusters=4"])
    t = Trainer.__new__(Trainer)  # the training step alone: no manifest splits, tracking or mining
    t.cfg, t.device, t.rank, t.world = cfg, torch.device("cpu"), 0, 1
    t.state, t.tracker = TrainState(generation=gen), _Recorder()
    t.train = type("Split", (), {"q_keys": q_keys, "db_keys": db_keys})()
    t.stop, t.watchdog, t.position = StopRequest(60.0), Watchdog(str), None  # no signal handlers installed
    torch.manual_seed(0)
    net = build_model("smallcnn", weights=None, num_clusters=4)
    return t, build_engine("ddp", net, t.device, 0.01, 0.9, 0.001, "fp32")


@pytest.mark.parametrize("gen", [0, 1])
def test_losses_stay_on_device_but_log_and_return_every_value(toy, gen):
    shards, q_keys, db_keys = toy
    tuples = _tuples(10, 2)
    teacher = None
    if gen:
        pairs = sorted({(t.query, int(j)) for t in tuples for j in t.difficult_positives})
        q, j = (np.array(v, dtype=np.int64) for v in zip(*pairs))
        sims = np.random.default_rng(0).uniform(-1, 1, (len(pairs), 9)).astype(np.float32)
        teacher = TeacherCache.from_triplets(q, j, sims, 4, "t")
    runs = {}
    for log_every in (1, 3):
        t, engine = _trainer(shards, q_keys, db_keys, log_every, gen)
        with t._tuple_loader() as loader:
            runs[log_every] = (t._train_subset(engine, loader, gen, 0, 0, tuples, teacher), t.tracker.logged)
    every, sparse = runs[1], runs[3]
    assert len(every[0]) == 5 and all(isinstance(v, float) for v in every[0])
    assert sparse[0] == every[0]  # reading the values less often changes none of them
    assert [m["loss"] for m in every[1]] == every[0]  # each logged value is that step's loss
    assert [(m["step"], m["loss"]) for m in sparse[1]] == [(3, every[0][2])]
    keys = {"loss_hard", "loss_soft"} if gen else {"loss_hard"}
    assert all(keys <= set(m) and all(isinstance(m[k], float) for k in keys) for m in every[1])
    if gen == 0:
        assert [m["loss_hard"] for m in every[1]] == every[0]
    # colour jitter on the device: the same step, other images
    t, engine = _trainer(shards, q_keys, db_keys, 1, gen, jitter_on_device=True)
    with t._tuple_loader() as loader:
        on_device = t._train_subset(engine, loader, gen, 0, 0, tuples, teacher)
    assert len(on_device) == 5 and np.isfinite(on_device).all() and on_device != every[0]
