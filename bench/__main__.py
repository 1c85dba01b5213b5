"""Run the benchmarks and print one JSON document.

    python -m bench                 # all
    python -m bench pipeline        # one or more by name: pipeline, door, recognition, aggregator,
                                    # cost, scaleout, sync, recordings, update
    python -m bench --out FILE      # also write the JSON to FILE
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

SUITES = ("pipeline", "door", "recognition", "aggregator", "cost", "scaleout", "sync", "recordings",
          "update")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("suites", nargs="*", default=[], help=f"any of {', '.join(SUITES)}")
    parser.add_argument("--out", type=Path, default=Path("bench-output/bench.json"))
    args = parser.parse_args(argv)
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    results: dict[str, object] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name in args.suites or SUITES:
        module = importlib.import_module(f"bench.{name}")
        print(f"running bench {name} ...", file=sys.stderr, flush=True)
        results[name] = module.run()
    text = json.dumps(results, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
