"""Prints the constraints that scripts/install.sh applies: the lines of a constraints file, less the
packages that an already installed torch depends on (they stay at the versions that torch needs).

    python scripts/lock_filter.py constraints.txt --torch-installed 0|1
"""
from __future__ import annotations

import argparse
import re
from importlib import metadata


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_closure() -> set[str]:
    """torch and every installed distribution it requires, directly or not (extras aside)."""
    seen: set[str] = set()
    todo = ["torch"]
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in requires:
            if re.search(r"\bextra\s*==", req):
                continue
            todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("constraints")
    parser.add_argument("--torch-installed", type=int, choices=(0, 1), default=0)
    args = parser.parse_args(argv)
    drop = torch_closure() if args.torch_installed else set()
    with open(args.constraints) as f:
        for line in f:
            pin = re.match(r"\s*([A-Za-z0-9._-]+)\s*==", line)
            if pin is None or canonical(pin.group(1)) not in drop:
                print(line, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
