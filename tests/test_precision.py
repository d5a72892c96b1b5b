"""``auto`` precision: the decision (probe stubbed), its config form and resuming a run."""

from __future__ import annotations

import pytest
import yaml

from sfrs_dist.config import ConfigError, check_resume, load_config
from sfrs_dist.precision import Hardware, choose, read_cpu_flags, resolve_config, saved_run_config

AMX_CPU = ("fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
AVX2_CPU = ("fpu", "sse4_2", "avx", "avx2", "fma")


def test_amx_cpu_chooses_bf16():
    c = choose("auto", "auto", "auto", Hardware("cpu", AMX_CPU))
    assert (c.train, c.eval_bf16, c.search_bf16, c.eval_search_bf16) == ("bf16", True, True, True)
    assert c.sources == ("hardware",) * 4 and "amx_bf16" in c.hardware
    assert choose("auto", "auto", "auto", Hardware("cpu", ("avx512_bf16",))).train == "bf16"


def test_avx2_only_cpu_chooses_fp32():
    c = choose("auto", "auto", "auto", Hardware("cpu", AVX2_CPU))
    assert (c.train, c.eval_bf16, c.search_bf16) == ("fp32", False, False)


def test_cuda_with_bf16_chooses_bf16_training():
    c = choose("auto", "auto", "auto", Hardware("cuda", AVX2_CPU, (8, 0)))
    assert c.train == "bf16"
    # bf16 extraction and both bf16 searches on the GPU, whatever this CPU computes
    assert (c.eval_bf16, c.eval_search_bf16, c.search_bf16) == (True, True, True)
    c = choose("auto", "auto", "auto", Hardware("cuda", AMX_CPU, (9, 0), faiss_gpus=1))
    # exact faiss GPU searches kept; bf16 extraction no longer tied to them
    assert (c.train, c.eval_bf16, c.search_bf16, c.eval_search_bf16) == ("bf16", True, False, False)
    c = choose("auto", "auto", "auto", Hardware("cuda", AMX_CPU, (9, 0)))
    assert (c.train, c.eval_bf16, c.search_bf16, c.eval_search_bf16) == ("bf16", True, True, True)
    c = choose("auto", "auto", "auto", Hardware("cuda", AMX_CPU, (7, 0)), "auto")  # V100: no bf16 on the GPU
    assert (c.eval_bf16, c.eval_search_bf16, c.search_bf16) == (False, False, False)
    assert choose("auto", "auto", "auto", Hardware("cuda", AMX_CPU, (7, 0))).train == "fp32"  # V100: no bf16


def test_explicit_values_win():
    c = choose("fp32", False, False, Hardware("cpu", AMX_CPU))
    assert (c.train, c.eval_bf16, c.search_bf16) == ("fp32", False, False)
    c = choose("fp16", True, True, Hardware("cuda", AVX2_CPU, (7, 5)), True)
    assert (c.train, c.eval_bf16, c.search_bf16, c.eval_search_bf16) == ("fp16", True, True, True)
    assert c.sources == ("explicit",) * 4


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: x\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert read_cpu_flags(str(f)) == ("fpu", "avx2", "amx_bf16")
    assert read_cpu_flags(str(tmp_path / "missing")) == ()


def test_config_accepts_auto_and_explicit_values():
    cfg = load_config(None)
    assert (cfg.train.precision, cfg.eval.bf16, cfg.mining.bf16_search) == ("auto", "auto", "auto")
    cfg = load_config(None, ["train.precision=bf16", "eval.bf16=true", "mining.bf16_search=false"])
    assert (cfg.train.precision, cfg.eval.bf16, cfg.mining.bf16_search) == ("bf16", True, False)
    with pytest.raises(ConfigError, match="eval.bf16 must be true, false or auto, got 'maybe'"):
        load_config(None, ["eval.bf16=maybe"])
    with pytest.raises(ConfigError, match="mining.bf16_search: expected true/false or a string, got 3"):
        load_config(None, ["mining.bf16_search=3"])
    with pytest.raises(ConfigError, match="train.precision must be fp32, bf16, fp16 or auto"):
        load_config(None, ["train.precision=fp8"])


def test_resolved_config_and_mlflow_params():
    cfg, choice = resolve_config(load_config(None), "cpu", hardware=Hardware("cpu", AMX_CPU))
    assert (cfg.train.precision, cfg.eval.bf16, cfg.mining.bf16_search) == ("bf16", True, True)
    params = choice.params()
    assert params["precision.train"] == "bf16" and params["precision.sources"] == "hardware,hardware,hardware,hardware"
    assert cfg.eval.bf16_search is True and params["precision.eval_search_bf16"] == "True"
    again, same = resolve_config(cfg, "cpu", hardware=Hardware("cpu", AVX2_CPU))  # resolved: nothing left to do
    assert again == cfg and same.sources == ("explicit",) * 4


def _run_dir(tmp_path, saved: dict):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    base = load_config(None, [f"run.out_dir={run}"]).to_dict()
    for section, values in saved.items():
        base[section].update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(base))
    return run


@pytest.mark.parametrize("saved, hw, expect", [
    # a run saved by a version without 'auto' (fp32 written out), resumed on a bf16 machine
    ({"train": {"precision": "fp32"}, "eval": {"bf16": False}, "mining": {"bf16_search": False}}, AMX_CPU,
     ("fp32", False, False)),
    # a run started on a bf16 machine, resumed on one without
    ({"train": {"precision": "bf16"}, "eval": {"bf16": True}, "mining": {"bf16_search": True}}, AVX2_CPU,
     ("bf16", True, True)),
])
def test_resumed_run_keeps_its_precision(tmp_path, saved, hw, expect):
    run = _run_dir(tmp_path, saved)
    cfg = load_config(None, [f"run.out_dir={run}"])  # 'auto' everywhere
    resolved, choice = resolve_config(cfg, "cpu", saved=saved_run_config(cfg, run, True), hardware=Hardware("cpu", hw))
    assert (resolved.train.precision, resolved.eval.bf16, resolved.mining.bf16_search) == expect
    assert choice.sources == ("resumed run",) * 3 + ("hardware",)  # saved before eval.bf16_search existed
    check_resume(resolved, run, True)  # no conflict


def test_explicit_precision_change_on_resume_is_refused(tmp_path):
    run = _run_dir(tmp_path, {"train": {"precision": "fp32"}})
    cfg = load_config(None, [f"run.out_dir={run}", "train.precision=bf16"])
    resolved, _ = resolve_config(cfg, "cpu", saved=saved_run_config(cfg, run, True), hardware=Hardware("cpu", AMX_CPU))
    with pytest.raises(ConfigError, match="train.precision: 'fp32' -> 'bf16'"):
        check_resume(resolved, run, True)
