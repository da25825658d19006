"""docs/RELIABILITY.md lists exactly the tests marked reliability(kind, what, outcome), and the plugin that
writes it (tests/reliability_report.py) reads back what it writes and refuses malformed markers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_report import ENV, NOT_RUN, Entry, marker_entry, parse, render

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "RELIABILITY.md"


@pytest.mark.integration  # collects the whole suite in a pytest process of its own
def test_reliability_doc_lists_every_marked_test(tmp_path):
    collected = tmp_path / "collected.md"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "reliability", "-p", "no:cacheprovider"],
        cwd=REPO, env={**os.environ, ENV: str(collected)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    suite, doc = set(parse(collected.read_text())), set(parse(DOC.read_text()))
    assert len(suite) >= 30
    missing = sorted(e.nodeid for e in suite - doc)
    stale = sorted(e.nodeid for e in doc - suite)
    assert not missing and not stale, (f"docs/RELIABILITY.md is out of date (regenerate it with `make reliability`): "
                                       f"not listed or changed: {missing}; listed but not in the suite: {stale}")


def test_render_and_parse_round_trip_with_pipes_and_brackets():
    entries = [Entry("bad input", "a | b", "exit 2", "tests/t.py::test_x[a|b-1]"),
               Entry("fault", "S3 503", "retried", "tests/t.py::test_y"),
               Entry("security", "keys in config", "refused", "tests/t.py::test_z")]
    text = render(entries, {"tests/t.py::test_x[a|b-1]": "passed", "tests/t.py::test_y": "failed"})
    assert parse(text) == entries
    assert "| bad input | 1 | 1 | 0 | 0 |" in text and "| fault | 1 | 0 | 1 | 0 |" in text
    assert "| security | 1 | 0 | 0 | 1 |" in text and f"`tests/t.py::test_z` | {NOT_RUN} |" in text


class FakeItem:
    nodeid = "tests/t.py::test_x"

    def __init__(self, mark):
        self.mark = mark

    def get_closest_marker(self, name):
        return self.mark if name == "reliability" else None


@pytest.mark.parametrize("mark, message", [
    (pytest.mark.reliability(kind="bad inputs", what="x", outcome="y"),
     "tests/t.py::test_x: reliability kind 'bad inputs'; expected one of ['bad input', 'fault', 'security']"),
    (pytest.mark.reliability(kind="fault", what="", outcome="y"),
     "tests/t.py::test_x: reliability what ''; expected one line of text"),
    (pytest.mark.reliability(kind="fault", what="x"),
     "tests/t.py::test_x: reliability outcome None; expected one line of text"),
    (pytest.mark.reliability(kind="fault", what="x", outcome="y", severity=3),
     "tests/t.py::test_x: reliability marker takes kind, what, outcome; got () {'kind': 'fault', 'what': 'x', "
     "'outcome': 'y', 'severity': 3}"),
])
def test_malformed_markers_are_usage_errors(mark, message):
    with pytest.raises(pytest.UsageError) as error:
        marker_entry(FakeItem(mark.mark))
    assert str(error.value) == message


def test_positional_marker_arguments():
    entry = marker_entry(FakeItem(pytest.mark.reliability("fault", " S3 503 ", "retried").mark))
    assert entry == Entry("fault", "S3 503", "retried", "tests/t.py::test_x")
    assert marker_entry(FakeItem(None)) is None
