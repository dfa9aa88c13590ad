"""The data layer and Ray Data: peak memory reading a large Parquet input, and rows/s of `idefics2 batch` in
one process against `--ray` with 1 and 2 actors (the built-in model, on this machine).

    python benchmarks/bench_data.py --rows 100000 --answer-rows 48

Memory: a Parquet file of `--rows` rows, each a distinct noise image (PNG bytes) and a question, is read
through idefics2.data (every image decoded) in a fresh process, whose peak RSS is compared with the RSS after
the imports and with a process that reads the same file whole (pyarrow.parquet.read_table).
Throughput: the first `--answer-rows` rows answered by `idefics2 batch` (wall time of the whole command, so
Ray's start and the actors' model loading are included; the ratios are what to compare).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

READ_WITH_LAYER = """
import resource, sys
from idefics2.data import read_rows
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = errors = 0
for row in read_rows(sys.argv[1]):
    rows += 1
    errors += row.error is not None
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(rows, errors, before, peak)
"""

READ_WHOLE = """
import resource, sys
import pyarrow.parquet as pq
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
table = pq.read_table(sys.argv[1])
rows = table.num_rows
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(rows, 0, before, peak)
"""


def write_input(path: Path, rows: int, side: int) -> None:
    """`rows` rows of a distinct side x side noise PNG and a question, written in row groups of 1,000."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    generator = np.random.default_rng(0)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("question", pa.string())])  # fmt: skip
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as writer:
        for start in range(0, rows, 1000):
            images, questions = [], []
            for k in range(start, min(rows, start + 1000)):
                out = io.BytesIO()
                pixels = generator.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(out, "PNG")
                images.append({"bytes": out.getvalue(), "path": None})
                questions.append(f"What is in picture {k}?")
            writer.write_table(pa.table({"image": images, "question": questions}, schema=schema))


def peak_rss(script: str, path: Path) -> tuple[int, int, float, float, float]:
    """(rows, errors, RSS after imports MiB, peak RSS MiB, seconds) of `script` run on `path`."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env)
    if run.returncode:
        raise SystemExit(run.stderr)
    rows, errors, before, peak = (int(x) for x in run.stdout.split())
    return rows, errors, before / 1024, peak / 1024, time.perf_counter() - started


def answer(source: Path, target: Path, extra: list[str], max_new_tokens: int) -> float:
    """Seconds of one `idefics2 batch` command."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    argv = [sys.executable, "-m", "idefics2.cli", "batch", "--input", str(source), "--output", str(target),
            "--max-new-tokens", str(max_new_tokens), "--no-progress", *extra]  # fmt: skip
    started = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, env=env)
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the large Parquet input")
    parser.add_argument("--side", type=int, default=48, help="side of each noise image, pixels")
    parser.add_argument("--answer-rows", type=int, default=48, help="rows answered in the throughput part")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        large = folder / "large.parquet"
        started = time.perf_counter()
        write_input(large, args.rows, args.side)
        size = large.stat().st_size / 2**20
        print(f"wrote {args.rows} rows, {size:.0f} MiB, in {time.perf_counter() - started:.0f} s", flush=True)
        for name, script in (("idefics2.data, streamed", READ_WITH_LAYER), ("read_table, whole", READ_WHOLE)):
            rows, errors, before, peak, seconds = peak_rss(script, large)
            rate = rows / seconds
            print(f"{name:<24} {rows} rows ({errors} errors) in {seconds:5.1f} s ({rate:7.0f} rows/s): "
                  f"peak RSS {peak:6.0f} MiB, {peak - before:+6.0f} MiB over the imports",
                  flush=True)  # fmt: skip

        import pyarrow.parquet as pq

        small = folder / "small.parquet"
        pq.write_table(pq.read_table(large).slice(0, args.answer_rows), small)
        ray = ["--ray", "--cpus-per-actor", "0.5", "--actors"]
        runs = [("one process", []), ("--ray, 1 actor", [*ray, "1"]), ("--ray, 2 actors", [*ray, "2"])]
        baseline = None
        for name, extra in runs:
            seconds = answer(small, folder / "out.jsonl", extra, args.max_new_tokens)
            rate = args.answer_rows / seconds
            baseline = baseline or rate
            print(f"{name:<16} {args.answer_rows} rows in {seconds:5.1f} s: {rate:5.2f} rows/s "
                  f"({rate / baseline:.2f}x one process)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
