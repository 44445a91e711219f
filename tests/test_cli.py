"""The command line: ``demo`` covers every algorithm accurately; ``report`` prints its table."""

from __future__ import annotations

import io

import pytest

from convbasis.__main__ import demo, main

ALGORITHMS = (
    "dense attention",
    "dense attention backward",
    "masked low-rank product",
    "masked Hadamard product",
    "polynomial low-rank attention",
    "k-conv basis attention",
    "conv-basis gradients",
    "low-rank gradients",
    "fast multipole attention",
    "transformer training step",
)
# The training-step row uses conv attention of rank 8 on a random model, which has no exact
# 8-segment basis: its documented accuracy is a few percent, not float32 round-off.
APPROXIMATE = {"transformer training step": 0.1}


def _table(text):
    rows = {}
    for line in text.splitlines()[2:]:
        name, *numbers = line.rsplit(maxsplit=4)
        rows[name] = [float(x) for x in numbers]
    return rows


def test_demo_covers_every_algorithm_with_small_errors():
    out = io.StringIO()
    demo(n=256, d=16, file=out, progress=None)
    rows = _table(out.getvalue())
    for algorithm in ALGORITHMS:
        matches = [name for name in rows if name.startswith(algorithm)]
        assert matches, f"demo has no row for {algorithm!r}:\n{out.getvalue()}"
    for name, (n, _, err, sec) in rows.items():
        # float32 inputs: exact methods reach ~1e-6, approximations their documented accuracy
        assert n == 256 and sec > 0, name
        bound = next((b for key, b in APPROXIMATE.items() if name.startswith(key)), 1e-2)
        assert 0 <= err < bound, (name, err)


# conv on unstructured inputs is approximate: the report prints its error, and it warns
@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
def test_report_prints_a_row_per_method(capsys):
    assert main(["report", "--n", "300", "--d", "4", "--method", "all"]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split()[0] for line in lines] == ["dense", "lowrank", "conv", "multipole"]


def test_demo_runs_at_tiny_and_odd_sizes():
    for n, d in ((1, 2), (3, 1), (12, 7)):
        out = io.StringIO()
        demo(n=n, d=d, file=out, progress=None)
        for name, (n_, _, err, _) in _table(out.getvalue()).items():
            bound = next((b for key, b in APPROXIMATE.items() if name.startswith(key)), 1e-2)
            assert n_ == n and 0 <= err < bound, (n, d, name, err)
