"""Does overlapping a CPU worker's writes with its network pay on this machine?

Method, in one process: the default CPU engine (OpenVINO, all cores) runs the demo
RSUNet on batches of 2 patches,

1. alone: seconds per patch;
2. alone, once more, while nothing else runs: the block-compression rate of a
   second thread alone (gzip level 1 of 64 x 64 x 12 x 3 float32 network-output
   blocks, as a merge writes them);
3. together: the network in the main thread while the other thread compresses
   blocks, for the same number of batches.

Overlap pays if the work done together (patches and blocks, each weighted by
its time alone) exceeds the wall time: ``gain = (patches x s/patch + blocks x
s/block) / wall``; 1.0 means the two only share the cores, below 1.0 they get
in each other's way.  This is what a second task in flight on a CPU worker
would do while the first computes (``worker --tasks-in-flight 2``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._report import write_section  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--write", action="store_true", help="replace this section in docs/benchmarks.md")
    args = ap.parse_args(argv)

    import deflate

    from chunk_ops.engines import machine_cores
    from chunk_ops.models.demo import bundled_model_spec, bundled_weights
    from chunk_ops.models.loading import load_predictor
    from chunk_ops.spec import parse_spec

    spec = parse_spec({"input": {"url": "file:///unused"},
                       "output": {"url": "file:///unused-out", "block_size": [64, 64, 8]},
                       "model": bundled_model_spec(bundled_weights()), "inference": {"batch_size": 2}})
    predictor = load_predictor(spec)
    rng = np.random.default_rng(0)
    batch = rng.random((2, 1, *spec.model.input_patch.zyx()), dtype=np.float32)
    affinities = 1 / (1 + np.exp(-rng.normal(2, 2, (3, 12, 64, 64))))
    block = affinities.astype(np.float32).tobytes()

    def network(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            predictor.engine(batch)
        return time.perf_counter() - t0

    network(1)  # warm up
    per_patch = network(args.batches) / (2 * args.batches)
    t0, blocks_alone = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:
        deflate.gzip_compress(block, 1)
        blocks_alone += 1
    per_block = (time.perf_counter() - t0) / blocks_alone

    stop, blocks = threading.Event(), [0]

    def compress() -> None:
        while not stop.is_set():
            deflate.gzip_compress(block, 1)
            blocks[0] += 1

    side = threading.Thread(target=compress)
    side.start()
    wall = network(args.batches)
    stop.set()
    side.join()
    together_per_patch = wall / (2 * args.batches)
    gain = (2 * args.batches * per_patch + blocks[0] * per_block) / wall

    command = ".venv/bin/python bench/overlap.py" + (" --write" if args.write else "")
    text = "\n".join([
        "## Overlapping writes with the network on a CPU worker", "", "```", command, "```", "",
        f"- {machine_cores()} cores; engine {predictor.engine.name} on {predictor.engine.threads} threads; "
        f"method in the docstring of `bench/overlap.py`", "",
        "| measure | value |", "| --- | --- |",
        f"| network alone | {per_patch * 1e3:.1f} ms/patch |",
        f"| block compression alone (gzip level 1, 64 x 64 x 12 x 3 float32) | {per_block * 1e3:.2f} ms/block |",
        f"| network while a second thread compresses | {together_per_patch * 1e3:.1f} ms/patch "
        f"({together_per_patch / per_patch:.2f}x slower), {blocks[0]} blocks compressed meanwhile |",
        f"| **gain = work done together (at the alone rates) / wall** | **{gain:.2f}** |", "",
        "Below or near 1.0, a second task in flight only takes cores from the network: CPU workers keep one "
        "task in flight by default (`worker --tasks-in-flight 0` = 2 on CUDA, 1 on CPU), and the fixed costs are "
        "cut instead (pieces of partial sums, gzip level 1, no thread pools on local disk). Where storage is "
        "remote, a write waits on the network rather than the CPU: `--tasks-in-flight 2` then overlaps it.",
    ]) + "\n"
    sys.stdout.write(text)
    if args.write:
        write_section("overlap", text)


if __name__ == "__main__":
    main()
