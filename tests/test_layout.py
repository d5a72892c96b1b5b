"""The package layout follows the pipeline: every import points to an earlier stage.

Stages, in order (a module may import its own stage's package and anything before it):

    0 distributed; then config, logging_utils, progress, checkpoint_io; then precision
    1 data
    2 losses; then models (which use the losses' float32 helper)
    3 extraction (distributed passes over shards, used by mining, evaluation, teacher, training)
    4 mining, evaluation, tracking, mlflow_server (siblings: none imports another)
    5 teacher
    6 training

``python tests/test_layout.py`` prints the graph between packages and any violation.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

PKG = Path(__file__).resolve().parent.parent / "sfrs_dist"
STAGES = {
    "distributed": 0.0, "cuda_builds": 0.0, "device_check": 0.05, "config": 0.1, "logging_utils": 0.1, "progress": 0.1, "checkpoint_io": 0.1, "precision": 0.2,
    "data": 1,
    "losses": 2.0, "models": 2.1,
    "extraction": 3,
    "mining": 4, "evaluation": 4, "tracking": 4, "mlflow_server": 4,
    "teacher": 5,
    "training": 6,
}


def unit_of(module: str) -> str:
    """``sfrs_dist.mining.knn`` -> ``mining`` (the first component below sfrs_dist)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__init__" else ""  # sfrs_dist/__init__: the root


def imports_of(path: Path) -> Set[str]:
    """Absolute sfrs_dist modules imported by the file (relative imports resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    package = parts if path.name == "__init__.py" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x
                    out |= {f"{mod}.{a.name}" for a in node.names}
                    continue
            else:
                mod = node.module or ""
            if mod.startswith("sfrs_dist"):
                out.add(mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sfrs_dist")}
    return out


def package_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = defaultdict(set)
    for path in sorted(PKG.rglob("*.py")):
        src = unit_of(".".join(path.relative_to(PKG.parent).with_suffix("").parts))
        for mod in imports_of(path):
            dst = unit_of(mod)
            if dst and dst != src:
                graph[src].add(dst)
    return graph


def violations(graph: Dict[str, Set[str]]) -> List[Tuple[str, str]]:
    bad = []
    for src, dsts in graph.items():
        for dst in dsts:
            if src not in STAGES or dst not in STAGES or STAGES[dst] >= STAGES[src]:
                bad.append((src, dst))
    return sorted(bad)


def module_cycles() -> List[List[str]]:
    """Import cycles between modules (package ``__init__`` re-exports left out)."""
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        mods[name] = {m for m in imports_of(path)}
    graph = {m: {d for d in deps if d in mods and d != m} for m, deps in mods.items()}
    cycles, state = [], {}

    def visit(m: str, stack: List[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_module_imports_form_a_cycle():
    assert module_cycles() == []


def test_every_unit_has_a_stage():
    units = {unit_of(".".join(p.relative_to(PKG.parent).with_suffix("").parts)) for p in PKG.rglob("*.py")}
    assert units - {""} <= set(STAGES), f"modules without a stage: {sorted(units - {''} - set(STAGES))}"


def test_imports_run_one_way_down_the_pipeline():
    assert violations(package_graph()) == []


if __name__ == "__main__":
    g = package_graph()
    for src in sorted(g, key=lambda u: (STAGES.get(u, 99), u)):
        print(f"{STAGES.get(src, '?')} {src:<14} -> {', '.join(sorted(g[src], key=lambda u: (STAGES.get(u, 99), u)))}")
    bad = violations(g)
    for cycle in module_cycles():
        print("cycle: " + " -> ".join(cycle))
    print(f"\n{len(bad)} import(s) against the pipeline order" + "".join(f"\n  {a} -> {b}" for a, b in bad))
    sys.exit(1 if bad else 0)
