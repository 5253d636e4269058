"""Each test file's measured seconds, so that pytest-xdist starts the longest files first.

``tests/file_durations.json`` holds ``{path relative to the repo: seconds}`` from one full run
(setup, call and teardown of every test, as the JUnit report counts them). Refresh it after adding
or reshaping long tests:

  python -m pytest -n 2 --dist loadfile -q --junitxml=/tmp/junit.xml
  python -m tests.file_durations /tmp/junit.xml

A file missing from the table counts as ``UNKNOWN_S`` (a new file is usually small); a stale table
only costs balance, never a test.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "file_durations.json")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNKNOWN_S = 5.0


def load(path: str = TABLE) -> dict[str, float]:
  """The table, or an empty one when the file is missing or unreadable."""
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, ValueError):
    return {}
  return {str(k): float(v) for k, v in table.items()}


def from_junit(junit_path: str) -> dict[str, float]:
  """Seconds per test file (``tests/a/test_b.py``) summed over a JUnit report's test cases."""
  seconds: dict[str, float] = {}
  for case in ET.parse(junit_path).iter("testcase"):
    if not case.get("classname"):
      continue  # a module skipped whole is reported without one (and takes no time)
    path = case.get("classname").replace(".", "/") + ".py"
    seconds[path] = seconds.get(path, 0.0) + float(case.get("time") or 0.0)
  return seconds


def main(argv: list[str], table: str = TABLE) -> int:
  """Writes the table (longest file first) from the JUnit report named by ``argv[1]``."""
  if len(argv) != 2:
    print("usage: python -m tests.file_durations JUNIT_XML", file=sys.stderr)
    return 2
  seconds = from_junit(argv[1])
  if not seconds:
    print(f"{argv[1]}: no test cases", file=sys.stderr)
    return 2
  # A file the run skipped whole (test_vs_pytorch.py without PyTorch, as in CI) keeps its figure
  # from the table, where the file still exists: another environment runs it.
  for path, before in load(table).items():
    if path not in seconds and os.path.exists(os.path.join(REPO, path)):
      seconds[path] = before
  ordered = {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
  with open(table, "w") as f:
    json.dump(ordered, f, indent=1)
    f.write("\n")
  print(f"{table}: {len(ordered)} files, {sum(ordered.values()):.0f} s in all")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
