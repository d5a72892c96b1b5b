"""The results table in the shape papers print: one row per network, columns dataset x R@N.

``paper_table`` collects the overall Recall@N of every (row, test split) pair;
``to_markdown`` renders it (a note per split says its protocol: positives radius or Nordland
frames, spatial NMS, MSLS's query set); ``to_json`` gives the same numbers for tools.
Recalls are in percent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

from .recall import OVERALL

Table = Dict[str, Dict[int, float]]


@dataclass
class PaperTable:
    """Rows (networks / generations) x columns (test split x N), recalls in percent."""

    ns: List[int]
    splits: List[str] = field(default_factory=list)
    rows: Dict[str, Dict[str, Dict[int, float]]] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)

    def add(self, row: str, tables: Mapping[str, Tuple[Table, Dict[str, int]]]) -> None:
        """Add (or extend) a row from ``{split: (recall table, query counts)}``."""
        cells = self.rows.setdefault(row, {})
        for sid, (table, _counts) in tables.items():
            if sid not in self.splits:
                self.splits.append(sid)
            cells[sid] = {n: 100.0 * float(table[OVERALL][n]) for n in self.ns if n in table[OVERALL]}

    def to_json(self) -> Dict:
        return {
            "columns": [{"split": s, "recall_at": n} for s in self.splits for n in self.ns],
            "rows": {r: {s: {f"R@{n}": v for n, v in c.items()} for s, c in cells.items()}
                     for r, cells in self.rows.items()},
            "protocols": {s: self.notes.get(s, "") for s in self.splits},
        }

    def to_markdown(self) -> str:
        head = "| network | " + " | ".join(f"{s} R@{n}" for s in self.splits for n in self.ns) + " |"
        lines = [head, "|---|" + "---:|" * (len(self.splits) * len(self.ns))]
        for row, cells in self.rows.items():
            vals = [f"{cells[s][n]:.1f}" if s in cells and n in cells[s] else "-" for s in self.splits for n in self.ns]
            lines.append(f"| {row} | " + " | ".join(vals) + " |")
        notes = [f"- {s}: {self.notes[s]}" for s in self.splits if self.notes.get(s)]
        return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def paper_table(rows: Mapping[str, Mapping[str, Tuple[Table, Dict[str, int]]]], ns: Sequence[int] = (1, 5, 10),
                notes: Mapping[str, str] = ()) -> PaperTable:
    """A ``PaperTable`` from ``{row label: {split: (recall table, counts)}}`` (row and split order kept)."""
    out = PaperTable(ns=[int(n) for n in ns], notes=dict(notes))
    for label, tables in rows.items():
        out.add(label, tables)
    return out
