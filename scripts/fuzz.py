"""Long fuzzing campaigns over the surfaces of tests/fuzz_surfaces.py (the test suite runs a short one).

    python scripts/fuzz.py --cases 10000                       # every surface, 10,000 cases each
    python scripts/fuzz.py --cases 2000 --surface batch --seed 3 --json batch-3.json
    python scripts/fuzz.py --merge batch-*.json                # add up the figures of several runs

For each surface it counts the outcomes (ok, rejected: a clear ValueError/TypeError or the command's one-line
error, undocumented: anything else) and lists every undocumented exception: its type, message, where it was
raised, how often, and a reproducer shrunk from the first case that raised it (`SURFACES[name].run(case)` in
tests/fuzz_surfaces.py runs it again). Exit code 1 when there is any.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

KINDS = ("ok", "rejected", "undocumented")


def explore(surface, cases: int, seed: int) -> dict[str, Any]:
    """Run at least `cases` cases (a `batch` example holds several lines, each a case)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    counts: Counter = Counter()
    found: dict[str, dict[str, Any]] = {}
    start = time.monotonic()
    for round_number in range(10_000):
        remaining = cases - sum(counts.values())
        if remaining <= 0:
            break

        @settings(
            max_examples=min(remaining, 2000),
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis_seed(seed * 100_003 + round_number)
        @given(surface.strategy)
        def run_round(case):
            if sum(counts.values()) >= cases:
                return
            for outcome in surface.run(case):
                counts[outcome.kind] += 1
                if outcome.kind == "undocumented":
                    entry = found.setdefault(
                        outcome.signature, {"case": case, "description": outcome.describe(), "count": 0}
                    )
                    entry["count"] += 1

        run_round()
    return {"counts": dict(counts), "found": found, "seconds": time.monotonic() - start}


def simpler(value: Any) -> Iterator[Any]:
    """Smaller versions of a plain-data case: fewer list/dict items, shorter strings, smaller numbers."""
    if isinstance(value, list):
        for i in reversed(range(len(value))):
            yield value[:i] + value[i + 1 :]
        for i, item in enumerate(value):
            for smaller in simpler(item):
                yield value[:i] + [smaller] + value[i + 1 :]
    elif isinstance(value, tuple):  # a spec: its leading tag names what it is and stays
        for i, item in enumerate(value):
            if isinstance(item, str) and (i == 0 or _is_name(item)):  # formats, modes, dtypes... stay
                continue
            for smaller in simpler(item):
                yield value[:i] + (smaller,) + value[i + 1 :]
    elif isinstance(value, dict):
        for key in list(value):
            yield {k: v for k, v in value.items() if k != key}
        for key, item in value.items():
            for smaller in simpler(item):
                yield {**value, key: smaller}
    elif isinstance(value, (str, bytes)) and value:
        yield value[:0]
        if len(value) > 1:
            yield value[: len(value) // 2]
            yield value[len(value) // 2 :]
        if len(value) <= 32:
            for i in range(len(value)):
                yield value[:i] + value[i + 1 :]
    elif isinstance(value, bool):
        if value:
            yield False
    elif isinstance(value, int) and value not in (0, 1):
        yield 0
        yield 1
        yield value // 2 if value > 0 else -(-value // 2)
    elif isinstance(value, float) and value not in (0.0, 1.0):
        yield 0.0
        yield 1.0


def _is_name(text: str) -> bool:
    """A name such as "PNG", "uint8" or "I;16" (a spec's choice), not free text."""
    return text.isascii() and text.isprintable() and " " not in text and 0 < len(text) <= 24


def shrink(case: Any, still_fails: Callable[[Any], bool], budget: int) -> Any:
    """Greedy shrinking: take the first simpler case that still fails, until none does or the budget ends."""
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for candidate in simpler(case):
            tries += 1
            if still_fails(candidate):
                case, improved = candidate, True
                break
            if tries >= budget:
                break
    return case


def run_surface(surface, cases: int, seed: int, shrink_budget: int) -> dict[str, Any]:
    result = explore(surface, cases, seed)
    for signature, entry in result["found"].items():

        def still_fails(candidate: Any, signature: str = signature) -> bool:
            try:
                outcomes = surface.run(candidate)
            except Exception:  # a candidate the runner cannot even build is not a reproducer
                return False
            return any(o.kind == "undocumented" and o.signature == signature for o in outcomes)

        entry["reproducer"] = repr(shrink(entry["case"], still_fails, shrink_budget))
        entry["case"] = repr(entry["case"])
    return result


def print_report(results: dict[str, dict[str, Any]]) -> int:
    total_undocumented = 0
    print(f"{'surface':<11} {'cases':>7} {'ok':>7} {'rejected':>9} {'undocumented':>13} {'seconds':>8}")
    for name, result in results.items():
        counts = result["counts"]
        n = sum(counts.values())
        print(
            f"{name:<11} {n:>7} {counts.get('ok', 0):>7} {counts.get('rejected', 0):>9} "
            f"{counts.get('undocumented', 0):>13} {result['seconds']:>8.0f}"
        )
        total_undocumented += counts.get("undocumented", 0)
    for name, result in results.items():
        for signature, entry in result["found"].items():
            print(f"\n[{name}] {signature} ({entry['count']}x)\n  {entry['description']}")
            print(f"  reproducer: SURFACES[{name!r}].run({_clip(entry.get('reproducer', entry['case']))})")
    return 1 if total_undocumented else 0


def _clip(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def merge(paths: list[str]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for name, result in json.loads(Path(path).read_text()).items():
            into = merged.setdefault(name, {"counts": {}, "found": {}, "seconds": 0.0})
            for kind, n in result["counts"].items():
                into["counts"][kind] = into["counts"].get(kind, 0) + n
            into["seconds"] += result["seconds"]
            for signature, entry in result["found"].items():
                if signature in into["found"]:
                    into["found"][signature]["count"] += entry["count"]
                else:
                    into["found"][signature] = entry
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=1000, help="cases per surface (default 1000)")
    parser.add_argument("--surface", action="append", help="a surface to run (repeatable; default: all)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (a run is reproducible from it)")
    parser.add_argument("--shrink-budget", type=int, default=300, help="runs spent shrinking each finding")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="print the sum of earlier --json results")
    args = parser.parse_args(argv)
    if args.merge:
        return print_report(merge(args.merge))

    import torch

    from fuzz_surfaces import SURFACES

    torch.set_num_threads(args.threads)
    names = args.surface or list(SURFACES)
    unknown = [name for name in names if name not in SURFACES]
    if unknown:
        parser.error(f"unknown surface(s) {unknown}; choose from {list(SURFACES)}")
    results = {}
    for name in names:
        results[name] = run_surface(SURFACES[name], args.cases, args.seed, args.shrink_budget)
        counts = results[name]["counts"]
        print(
            f"{name}: {sum(counts.values())} cases, {counts}, {results[name]['seconds']:.0f} s",
            file=sys.stderr,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=repr) + "\n")
    return print_report(results)


if __name__ == "__main__":
    sys.exit(main())
