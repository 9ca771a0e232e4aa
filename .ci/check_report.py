"""Read pytest's JUnit report: print the counts, fail when fewer tests ran than .ci/min-tests says or when a
test skipped for a reason .ci/allowed-skips does not list (one regular expression a line)."""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(report: str) -> int:
    minimum = int((HERE / "min-tests").read_text().split()[0])
    allowed = [re.compile(line) for line in (HERE / "allowed-skips").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    cases = ET.parse(report).getroot().iter("testcase")
    total, failed, skipped, bad = 0, 0, 0, []
    for case in cases:
        total += 1
        for child in case:
            if child.tag in ("failure", "error"):
                failed += 1
            elif child.tag == "skipped":
                reason = child.get("message", "")
                if child.get("type") == "pytest.xfail":
                    continue
                skipped += 1
                if not any(p.search(reason) for p in allowed):
                    bad.append(f"{case.get('classname')}::{case.get('name')}: {reason}")
    print(f"CI: {total} tests collected and run, {failed} failed, {skipped} skipped (minimum {minimum})")
    ok = True
    if total < minimum:
        print(f"error: {total} tests ran, fewer than the {minimum} in .ci/min-tests: were tests lost?")
        ok = False
    for line in bad:
        print(f"error: skipped in CI: {line}")
    return 0 if ok and not bad and not failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
