"""Plain-text summary of a finished job: Recall@N per generation, test set and condition."""

from __future__ import annotations

from typing import Dict, Optional, Sequence


def generation_table(history: Dict[int, Dict], ns: Sequence[int] = (1, 5, 10),
                     selected: Optional[Dict] = None, untrained: Optional[Dict] = None) -> str:
    """One row per (generation, test set, condition), recalls in percent.

    ``selected`` (the trainer's best-by-validation network) adds rows labelled ``sel``
    below, as the reference reports it: the best validation Recall@5 over all generations
    and epochs, PCA fitted on it. ``untrained`` (backbone weights + NetVLAD init) adds rows
    labelled ``off`` above.
    """
    head = f"{'gen':>3}  {'test set':<16}{'condition':<10}" + "".join(f"{'R@' + str(n):>8}" for n in ns)
    lines = [head, "-" * len(head)]
    rows = [("off", untrained.get("test", {}))] if untrained else []
    rows += [(f"{gen:>3}", history[gen].get("test", {})) for gen in sorted(history)]
    if selected:
        rows.append(("sel", selected.get("test", {})))
    for label, tests in rows:
        for sid, (table, _counts) in sorted(tests.items()):
            for cond, row in table.items():
                cells = "".join(f"{100.0 * row[n]:>8.1f}" if n in row else f"{'-':>8}" for n in ns)
                lines.append(f"{label}  {sid:<16}{cond:<10}{cells}")
    if untrained:
        lines.append("off = the untrained network (backbone weights + NetVLAD init)")
    if selected:
        lines.append(f"sel = generation {selected['generation']}'s best network by validation Recall@5 "
                     f"({100.0 * selected['val_recall5']:.1f}), the reference's reported choice")
        tied = selected.get("tied_with") or []
        if tied:
            lines.append(f"      decided by a tie: generation(s) {', '.join(str(g) for g in tied)} reached the same "
                         "validation Recall@5; the earliest is taken, as the reference does")
    return "\n".join(lines)
