"""tests/file_durations.py: the per-file seconds that order the files for pytest-xdist."""

import json

from tests import file_durations


def test_junit_seconds_are_summed_per_file_and_the_table_is_written_longest_first(tmp_path):
  junit = tmp_path / "junit.xml"
  junit.write_text(
    '<testsuites><testsuite name="pytest">'
    '<testcase classname="tests.a.test_x" name="one" time="1.25"/>'
    '<testcase classname="tests.b.test_y" name="two" time="4.0"/>'
    '<testcase classname="tests.a.test_x" name="three" time="2.5"/>'
    "</testsuite></testsuites>"
  )
  assert file_durations.from_junit(str(junit)) == {
    "tests/a/test_x.py": 3.75,
    "tests/b/test_y.py": 4.0,
  }
  table = tmp_path / "table.json"
  assert file_durations.main(["prog", str(junit)], table=str(table)) == 0
  written = json.loads(table.read_text())
  assert list(written) == ["tests/b/test_y.py", "tests/a/test_x.py"]
  assert file_durations.load(str(table)) == {"tests/b/test_y.py": 4.0, "tests/a/test_x.py": 3.8}


def test_a_file_the_run_skipped_keeps_its_figure_where_it_still_exists(tmp_path):
  junit = tmp_path / "junit.xml"
  junit.write_text(
    '<testsuites><testsuite name="pytest">'
    '<testcase classname="tests.a.test_x" name="one" time="1.5"/>'
    '<testcase classname="" name="tests.common.test_vs_pytorch" time="0.0"><skipped/></testcase>'
    "</testsuite></testsuites>"
  )
  table = tmp_path / "table.json"
  table.write_text(
    json.dumps({"tests/common/test_vs_pytorch.py": 90.0, "tests/gone/test_removed.py": 50.0})
  )
  assert file_durations.main(["prog", str(junit)], table=str(table)) == 0
  assert json.loads(table.read_text()) == {
    "tests/common/test_vs_pytorch.py": 90.0,
    "tests/a/test_x.py": 1.5,
  }


def test_a_missing_or_broken_table_orders_nothing(tmp_path):
  assert file_durations.load(str(tmp_path / "absent.json")) == {}
  broken = tmp_path / "broken.json"
  broken.write_text("{not json")
  assert file_durations.load(str(broken)) == {}


def test_the_committed_table_loads_with_a_positive_time_per_file():
  table = file_durations.load()
  assert len(table) > 30
  assert all(path.startswith("tests/") and path.endswith(".py") for path in table)
  assert all(seconds >= 0 for seconds in table.values())
