"""Installation: faiss comes from exactly one extra (cpu or gpu), launch/env.sh picks it and
switches cleanly, and sfrs_dist says what to run when faiss is missing."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_faiss_is_one_extra_not_a_requirement():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = cfg["options"]["install_requires"]
    extras = cfg["options.extras_require"]
    assert "faiss" not in requires
    assert extras["cpu"].split() == ["faiss-cpu>=1.7.4"]
    assert [r for r in extras["gpu"].split() if r.startswith("faiss")] == ["faiss-gpu-cu12>=1.8"]


def _fake_tools(folder: Path, nvidia_ok: bool) -> None:
    """``python3 -m venv`` making a venv whose python logs its arguments; an ``nvidia-smi``."""
    folder.mkdir(exist_ok=True)
    (folder / "python3").write_text(
        '#!/bin/bash\n[ "$1 $2" = "-m venv" ] || exec /usr/bin/python3 "$@"\nmkdir -p "$3/bin"\n'
        'printf \'#!/bin/bash\\necho "$*" >> "$PIP_LOG"\\n\' > "$3/bin/python"\n'
        'chmod +x "$3/bin/python"\n: > "$3/bin/activate"\n')
    (folder / "nvidia-smi").write_text(f"#!/bin/bash\nexit {0 if nvidia_ok else 1}\n")
    for f in folder.iterdir():
        f.chmod(0o755)


def _source_env(tmp_path: Path, nvidia_ok: bool, **extra: str) -> list:
    bin_dir = tmp_path / "bin"
    _fake_tools(bin_dir, nvidia_ok)
    log = tmp_path / "pip.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("SFRS_GPU", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", SFRS_VENV=str(tmp_path / "venv"), PIP_LOG=str(log), **extra)
    proc = subprocess.run(["bash", "-c", f"source {REPO / 'launch' / 'env.sh'}"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in log.read_text().splitlines()
            if line.startswith("-m pip") and "pip install --upgrade" not in line]


def test_env_sh_picks_the_faiss_extra_and_switches(tmp_path):
    stamp = tmp_path / "venv" / ".sfrs_installed"
    assert _source_env(tmp_path, nvidia_ok=False) == [f"-m pip install -e {REPO}[dev,cpu]"]
    assert stamp.read_text().strip() == "cpu"
    assert _source_env(tmp_path, nvidia_ok=False) == []  # installed: nothing to do
    # a login node without GPUs building the compute nodes' environment: the CPU build goes first
    assert _source_env(tmp_path, nvidia_ok=False, SFRS_GPU="1") == [
        "-m pip uninstall -y faiss-cpu faiss-gpu-cu12", f"-m pip install -e {REPO}[dev,gpu]"]
    assert stamp.read_text().strip() == "gpu"
    assert _source_env(tmp_path, nvidia_ok=True) == []  # nvidia-smi works: gpu, already there
    assert _source_env(tmp_path, nvidia_ok=True, SFRS_GPU="0") == [
        "-m pip uninstall -y faiss-cpu faiss-gpu-cu12", f"-m pip install -e {REPO}[dev,cpu]"]
    stamp.write_text("")  # a stamp from before the extras: its environment has faiss-cpu
    assert _source_env(tmp_path, nvidia_ok=False) == []


def test_import_without_faiss_names_the_install_command():
    hide = ("import importlib.machinery as m, sys\n"
            "class Hide(m.PathFinder):\n"
            "    @classmethod\n"
            "    def find_spec(cls, name, path=None, target=None):\n"
            "        return None if name == 'faiss' else m.PathFinder.find_spec(name, path, target)\n"
            "sys.meta_path = [f for f in sys.meta_path if f is not m.PathFinder] + [Hide]\n"
            "import sfrs_dist\n")
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode != 0
    assert "ImportError: sfrs_dist needs faiss" in proc.stderr and "pip install -e '.[cpu]'" in proc.stderr
