"""Run every benchmark (``make bench``): ``python -m bench [name ...]``.

Each ``bench/bench_<name>.py`` has ``main() -> dict`` and prints its ratios against a
baseline measured in the same process.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time

import bench


def main(argv: list[str]) -> int:
    names = argv or sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules(bench.__path__)
        if m.name.startswith("bench_")
    )
    results = {}
    for name in names:
        print(f"== bench_{name}", flush=True)
        t0 = time.perf_counter()
        results[name] = importlib.import_module(f"bench.bench_{name}").main()
        print(f"   ({time.perf_counter() - t0:.0f} s)\n", flush=True)
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
