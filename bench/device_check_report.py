"""Report plumbing of bench/device_check.sh.

    python bench/device_check_report.py junit FILE.xml        -> "passed=P failed=F errors=E skipped=S"
    python bench/device_check_report.py merge OUT.json A.json B.json ...

``merge`` gathers the benchmark JSON files (one per benchmark, see dspark_ops/bench/_record.py) into one file keyed
by file name; the script calls it again after every benchmark, so a run cut short still returns what it
measured.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_counts(path: str | Path) -> dict[str, int]:
    """Passed, failed, errors and skipped over every test suite of a pytest junit file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for s in suites:
        tests = int(s.get("tests", 0))
        failed, errors, skipped = (int(s.get(k, 0)) for k in ("failures", "errors", "skipped"))
        counts["failed"] += failed
        counts["errors"] += errors
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - errors - skipped
    return counts


def merge(out: str | Path, parts: list[str]) -> dict:
    """One JSON object {"benchmarks": {name: that file's object}}, names from the file stems; a file that
    does not parse is recorded as an error string instead of being dropped silently."""
    merged: dict = {"benchmarks": {}}
    for p in map(Path, parts):
        try:
            merged["benchmarks"][p.stem] = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            merged["benchmarks"][p.stem] = {"error": f"{type(e).__name__}: {e}"}
    Path(out).write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return merged


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "junit":
        print(" ".join(f"{k}={v}" for k, v in junit_counts(argv[1]).items()))
        return 0
    if len(argv) >= 2 and argv[0] == "merge":
        merge(argv[1], argv[2:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
