"""Every test file has exactly one kind (tests/conftest.py), so `pytest -m unit` and the
others each select one kind; a file without one, or with two, stops the run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


def test_a_file_of_one_kind_runs_and_is_selected_by_its_kind(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_pure="import pytest\npytestmark = pytest.mark.unit\ndef test_one(): pass\n",
        test_net="import pytest\npytestmark = pytest.mark.integration\ndef test_two(): pass\n",
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "-m", "unit").assert_outcomes(
        passed=1, deselected=1
    )


@pytest.mark.parametrize(
    ("marks", "named"),
    [
        ("", "test_unmarked.py (none)"),
        ("[pytest.mark.unit, pytest.mark.e2e]", "test_unmarked.py (e2e, unit)"),
    ],
)
def test_a_file_with_no_kind_or_two_stops_the_run_naming_it(
    pytester: pytest.Pytester, marks: str, named: str
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_marked="import pytest\npytestmark = pytest.mark.unit\ndef test_one(): pass\n",
        test_unmarked="import pytest\n"
        + (f"pytestmark = {marks}\n" if marks else "")
        + "def test_two(): pass\n",
    )
    # Even a run that would deselect the file checks it.
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-m", "unit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*exactly one kind*wrong: {named}*"])
