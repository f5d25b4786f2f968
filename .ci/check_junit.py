"""Fail when a test that needs a real service (Kafka broker, mlflow server, Prometheus) was skipped
or absent."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

SERVICES = ("kafka", "mlflow_server", "prometheus")


def main(path: str, services: tuple[str, ...] = SERVICES) -> int:
    """`services`: those at least one test in this report must have run against."""
    root = ET.parse(path).getroot()
    ran = {name: 0 for name in services}
    skipped: list[str] = []
    for case in root.iter("testcase"):
        needs = {p.get("value") for p in case.iter("property") if p.get("name") == "needs"}
        if not needs:
            continue
        label = f"{case.get('classname')}::{case.get('name')}"
        if case.find("skipped") is not None:
            skipped.append(f"{label} ({', '.join(sorted(needs))})")
            continue
        for name in needs & set(services):
            ran[name] += 1
    for name, count in ran.items():
        print(f"{name}: {count} test(s) ran")
    if skipped:
        print("skipped service-backed tests (not allowed in CI):", *skipped, sep="\n  ")
        return 1
    missing = [name for name, count in ran.items() if count == 0]
    if missing:
        print(f"no test ran against: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], tuple(sys.argv[2:]) or SERVICES))
