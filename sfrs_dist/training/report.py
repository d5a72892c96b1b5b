"""Plain-text summary of a finished job: Recall@N per generation, test set and condition."""

from __future__ import annotations

from typing import Dict, Sequence


def generation_table(history: Dict[int, Dict], ns: Sequence[int] = (1, 5, 10)) -> str:
    """One row per (generation, test set, condition), recalls in percent."""
    head = f"{'gen':>3}  {'test set':<16}{'condition':<10}" + "".join(f"{'R@' + str(n):>8}" for n in ns)
    lines = [head, "-" * len(head)]
    for gen in sorted(history):
        for sid, (table, _counts) in sorted(history[gen].get("test", {}).items()):
            for cond, row in table.items():
                cells = "".join(f"{100.0 * row[n]:>8.1f}" if n in row else f"{'-':>8}" for n in ns)
                lines.append(f"{gen:>3}  {sid:<16}{cond:<10}{cells}")
    return "\n".join(lines)
