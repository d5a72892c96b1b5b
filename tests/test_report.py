"""The final table of a job."""

from sfrs_dist.training.report import generation_table


def _tables(r1):
    return {"pitts30k_test": ({"all": {1: r1, 5: r1 + 0.1, 10: r1 + 0.2}}, {"all": 10})}


def test_selection_by_a_tie_is_said():
    history = {0: {"test": _tables(0.5)}, 1: {"test": _tables(0.6)}}
    sel = {"generation": 0, "val_recall5": 0.9, "test": _tables(0.5), "tied_with": [1]}
    text = generation_table(history, selected=sel)
    assert "decided by a tie: generation(s) 1" in text
    assert any(line.split() == ["0", "pitts30k_test", "all", "50.0", "60.0", "70.0"] for line in text.splitlines())
    assert "decided by a tie" not in generation_table(history, selected={**sel, "tied_with": []})
