"""The data layer and Ray Data: peak memory reading a large Parquet input, and rows/s of `idefics2 batch` in
one process against `--ray` with 1 and 2 actors (the built-in model, on this machine).

    python benchmarks/bench_data.py --rows 100000 --answer-rows 48

Memory: a Parquet file of `--rows` rows, each a distinct noise image (PNG bytes) and a question, is read
through idefics2.data (every image decoded) in a fresh process, whose peak RSS is compared with the same read
of the file's first tenth, and with a process that reads the file whole (pyarrow.parquet.read_table).
Throughput: the first `--answer-rows` rows answered by `idefics2 batch` in one process (the whole command,
model loading included) and by Predictor actors on a local 2-CPU Ray cluster (started beforehand; the actors'
start and model loading included). On a shared machine, the ratios are what to compare.
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

# the peak RSS of this process (VmHWM, kB; unlike ru_maxrss it does not carry over the parent's peak)
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
READ_WITH_LAYER = f"""
import sys
import idefics2.pipelines  # what reading a row imports (torch), before the first measure
from idefics2.data import read_rows
before = {PEAK}
rows = errors = 0
for row in read_rows(sys.argv[1]):
    rows += 1
    errors += row.error is not None
print(rows, errors, before, {PEAK})
"""

READ_WHOLE = f"""
import sys
import idefics2.pipelines
import pyarrow.parquet as pq
before = {PEAK}
table = pq.read_table(sys.argv[1])
print(table.num_rows, 0, before, {PEAK})
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
        import pyarrow.parquet as pq

        tenth = folder / "tenth.parquet"  # the first tenth: a bounded reader peaks as high on it
        pq.write_table(pq.read_table(large).slice(0, args.rows // 10), tenth, row_group_size=1000)
        readers = [("idefics2.data, 1/10", READ_WITH_LAYER, tenth), ("idefics2.data", READ_WITH_LAYER, large),
                   ("read_table, whole", READ_WHOLE, large)]  # fmt: skip
        for name, script, path in readers:
            rows, errors, before, peak, seconds = peak_rss(script, path)
            rate = rows / seconds
            print(f"{name:<24} {rows} rows ({errors} errors) in {seconds:5.1f} s ({rate:7.0f} rows/s): "
                  f"peak RSS {peak:6.0f} MiB, {peak - before:+6.0f} MiB over the imports",
                  flush=True)  # fmt: skip

        small = folder / "small.parquet"
        pq.write_table(pq.read_table(large).slice(0, args.answer_rows), small)
        seconds = answer(small, folder / "out.jsonl", [], args.max_new_tokens)
        baseline = args.answer_rows / seconds
        print(
            f"{'one process':<16} {args.answer_rows} rows in {seconds:5.1f} s: {baseline:5.2f} rows/s",
            flush=True,
        )
        for actors in (1, 2):
            seconds = answer_on_ray(small, actors, args.max_new_tokens)
            rate = args.answer_rows / seconds
            name = f"Ray, {actors} actor(s)"
            print(f"{name:<16} {args.answer_rows} rows in {seconds:5.1f} s: {rate:5.2f} rows/s "
                  f"({rate / baseline:.2f}x one process)", flush=True)  # fmt: skip


def answer_on_ray(source: Path, actors: int, max_new_tokens: int) -> float:
    """Seconds of answering `source` with Predictor actors on a local 2-CPU Ray cluster (started once, not
    timed; the actors' start and model loading are timed, as the one process's are)."""
    import ray
    import ray.data

    from idefics2.integrations.ray import Predictor

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    ray.data.read_parquet(str(source)).repartition(4 * actors).map_batches(
        Predictor,
        fn_constructor_kwargs={"max_new_tokens": max_new_tokens},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0.5,
        batch_size=8,
        batch_format="pyarrow",
    ).materialize()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
