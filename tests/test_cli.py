"""The command line: ``demo`` covers every algorithm accurately; ``report`` prints its table,
validates its options, shows progress when piped, and notes warnings and refusals."""

from __future__ import annotations

import io
import re
import sys
import warnings

import pytest

from convbasis.__main__ import demo, main
from convbasis.operators import METHODS

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
HEADER = "method            n    d   time [s]  dense [s]  speed-up  max error rel. error"


def _table(text):
    """Demo rows by name; the table ends at the first blank line (notes follow it)."""
    assert "notes:" not in text, text  # the demo's rows raise no warnings
    rows = {}
    for line in text.split("\n\n")[0].splitlines()[2:]:
        name, *numbers = line.rsplit(maxsplit=4)
        rows[name] = [float(x) for x in numbers]
    return rows


def _report(capsys, *options):
    """``report``'s table rows (split into cells), notes and standard error."""
    assert main(["report", "--n", "64", "--d", "4", *options]) == 0
    out, err = capsys.readouterr()
    table, _, notes = out.partition("\n\nnotes:\n")
    header, rule, *rows = table.splitlines()
    assert header == HEADER and rule == "-" * len(HEADER)
    return [row.split() for row in rows], notes.splitlines(), err


def test_demo_covers_every_algorithm_with_small_errors():
    out = io.StringIO()
    demo(n=256, d=16, file=out, progress=io.StringIO())
    rows = _table(out.getvalue())
    for algorithm in ALGORITHMS:
        matches = [name for name in rows if name.startswith(algorithm)]
        assert matches, f"demo has no row for {algorithm!r}:\n{out.getvalue()}"
    for name, (n, _, err, sec) in rows.items():
        # float32 inputs: exact methods reach ~1e-6, approximations their documented accuracy
        assert n == 256 and sec > 0, name
        bound = next((b for key, b in APPROXIMATE.items() if name.startswith(key)), 1e-2)
        assert 0 <= err < bound, (name, err)


def test_demo_runs_at_tiny_and_odd_sizes():
    for n, d in ((1, 2), (3, 1), (12, 7)):
        out = io.StringIO()
        demo(n=n, d=d, file=out, progress=io.StringIO())
        for name, (n_, _, err, _) in _table(out.getvalue()).items():
            bound = next((b for key, b in APPROXIMATE.items() if name.startswith(key)), 1e-2)
            assert n_ == n and 0 <= err < bound, (n, d, name, err)


def test_report_prints_a_row_per_method(capsys):
    rows, _, _ = _report(capsys, "--method", "all")
    assert [row[0] for row in rows] == list(METHODS)


@pytest.mark.parametrize("scale", ["0.125", "-0.5", "2"])
def test_report_scale_applies_to_every_row(capsys, scale):
    # Each of these is exact at n = 64 (below one multipole block; conv at rank n), lowrank
    # within its eps: an error beyond that means the row used another scale than the reference.
    methods = ["dense", "lowrank", "conv", "multipole"]
    options = ("--scale", scale, "--dtype", "float64", "--rank", "64", "--max-rank", "5000")
    rows, notes, _ = _report(capsys, "--method", *methods, *options)
    assert [row[0] for row in rows] == methods
    errors = {row[0]: float(row[7]) for row in rows}
    assert errors["dense"] < 1e-13 and errors["multipole"] < 1e-13, errors
    assert errors["conv"] < 1e-10 and errors["lowrank"] < 1e-2, errors
    assert not notes


def test_report_without_scale_uses_each_default(capsys):
    rows, _, _ = _report(capsys, "--method", "dense", "--dtype", "float64")
    assert float(rows[0][6]) < 1e-13


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        ("report", ["--n", "0"], "argument --n: must be a positive integer, got '0'"),
        ("report", ["--n", "64", "-5"], "argument --n: must be a positive integer, got '-5'"),
        ("report", ["--d", "0"], "argument --d: must be a positive integer, got '0'"),
        ("report", ["--n", "1e3"], "argument --n: must be an integer, got '1e3'"),
        ("report", ["--rank", "0"], "argument --rank: must be a positive integer"),
        ("report", ["--max-rank", "-1"], "argument --max-rank: must be a positive integer"),
        ("report", ["--eps", "1"], "argument --eps: must lie strictly between 0 and 1"),
        ("report", ["--scale", "nan"], "argument --scale: must be a finite number, got 'nan'"),
        ("report", ["--scale", "x"], "argument --scale: must be a finite number, got 'x'"),
        ("report", ["--block", "48"], "argument --block: must be a power of two, got 48"),
        ("report", ["--basis", "3"], "argument --basis: must divide --block 64, got 3"),
        ("report", ["--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
        ("demo", ["--n", "0"], "argument --n: must be a positive integer, got '0'"),
        ("demo", ["--d", "-2"], "argument --d: must be a positive integer, got '-2'"),
    ],
)
def test_bad_options_are_refused_by_name(capsys, command, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main([command, *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_report_progress_when_piped(capsys):
    # capsys's standard error is no terminal: one line per step, each with the elapsed time.
    _, _, err = _report(capsys, "--n", "32", "64", "--method", "dense", "conv", "--rank", "8")
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 8, err
    for n in (32, 64):
        for step in ("float64 reference", "dense baseline", "dense", "conv"):
            assert any(line.startswith(f"... {step} at n = {n} (") for line in lines), err
    assert all(line.endswith(" s elapsed)") for line in lines), err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_report_progress_on_a_terminal_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    _report(capsys, "--method", "dense")
    err = sys.stderr.getvalue()
    assert "\n" not in err and err.count("\r\033[K... ") == 3 and err.endswith("\r\033[K")


def test_report_warnings_become_notes(capsys):
    # Rank-4 conv on uniform random inputs has no few-segment structure: it warns.
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        rows, notes, err = _report(capsys, "--method", "conv", "multipole", "--rank", "4")
    assert not escaped
    assert rows[0][0] == "conv" and rows[0][-1] == "[1]" and len(rows[1]) == 8, rows
    assert len(notes) == 1 and notes[0].startswith("[1] ConvBasisWarning: the rank-4 conv basis")
    assert "ConvBasisWarning" not in err


def test_report_refused_row_keeps_the_columns(capsys):
    rows, notes, _ = _report(
        capsys, "--n", "32", "64", "--method", "lowrank", "dense", "--max-rank", "2"
    )
    assert [row[0] for row in rows] == ["lowrank", "dense", "lowrank", "dense"]
    for row, marker in ((rows[0], "[1]"), (rows[2], "[2]")):
        assert row[3] == "-" and row[5:8] == ["-"] * 3 and row[-1] == marker, row
        float(row[4])  # the dense time is measured all the same
    assert notes[0].startswith("[1] lowrank refused n = 32: the polynomial features would")
    assert notes[1].startswith("[2] lowrank refused n = 64:") and "max_rank=2" in notes[1]


def test_report_rows_line_up_under_the_header(capsys):
    main(["report", "--n", "32", "--d", "4", "--method", "lowrank", "conv", "--max-rank", "2"])
    lines = capsys.readouterr().out.splitlines()
    refused, warned = lines[2:4]
    assert refused.endswith(" [1]") and warned.endswith(" [2]"), lines
    titles = r"(?<= )(n|d|time \[s\]|dense \[s\]|speed-up|max error|rel\. error)(?= |$)"
    ends = [m.end() - 1 for m in re.finditer(titles, HEADER)]
    assert len(ends) == 7
    for row in (refused, warned):
        assert len(row.rsplit(" ", 1)[0]) == len(HEADER), lines
        # every number (or dash) is right-aligned under its column title
        assert all(row[i] != " " and row[i + 1] == " " for i in ends), (row, ends)
