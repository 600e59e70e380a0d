"""The run report's picture over a huge virtual volume: peak memory (RSS) and time.

A job over ``--side`` x ``--side`` x 64 voxels: the input (uint8) and the output
(float32, 3 channels, the bundled network's) are ``info`` files with ``--levels``
coarser mips declared (input 2x2x2 per level, output 2x2x1 as the pyramid) and no
block written, so every read is of missing blocks (``fill_missing``).  The report is
written in a child process, which prints its RSS growth (``ru_maxrss`` against the
RSS before) and the time; the full-resolution section it never holds is printed beside.

    .venv/bin/python bench/report_memory.py --side 32768 --levels 5
    .venv/bin/python bench/report_memory.py --side 100000 --levels 6 --verified
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def setup(workdir: Path, side: int, levels: int) -> Path:
    from chunk_ops.downsample import FACTOR
    from chunk_ops.geometry import Box, Vec3
    from chunk_ops.models.demo import write_demo_job
    from chunk_ops.volumes import add_mip, create_volume

    bounds = Box((0, 0, 0), (side, side, 64))
    image_url, output_url = f"file://{workdir}/image", f"file://{workdir}/affinities"
    create_volume(image_url, bounds=bounds, block_size=Vec3(128, 128, 1), dtype="uint8", num_channels=1,
                  resolution=(4, 4, 40))
    create_volume(output_url, bounds=bounds, block_size=Vec3(64, 64, 12), dtype="float32", num_channels=3,
                  resolution=(4, 4, 40))
    for mip in range(1, levels + 1):
        add_mip(image_url, Vec3(2, 2, 2), mip)
        add_mip(output_url, FACTOR, mip)
    doc = write_demo_job(workdir, image_url, output_url)
    doc["input"]["fill_missing"] = True
    doc["postprocess"] = {"pyramid_levels": levels, "segmentation": {"method": "none"}}
    path = workdir / "job.json"
    path.write_text(json.dumps(doc))
    return path


def rss_bytes() -> int:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec_path: str, verified: bool) -> None:
    """In a fresh process: open the job, then write the report; print RSS growth and time."""
    from chunk_ops.job import Job
    from chunk_ops.report import PictureGrid, write_report

    job = Job.open(json.loads(Path(spec_path).read_text()))
    before = rss_bytes()
    started = time.perf_counter()
    write_report(job, {"chunks": len(job.plan)}, verified=verified)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grid = PictureGrid.of(job)
    print(json.dumps({"rss_growth_mib": round((peak - before) / 2 ** 20, 1), "seconds": round(seconds, 2),
                      "chunks": len(job.plan), "section_chunks": job.plan.grid_shape.x * job.plan.grid_shape.y,
                      "picture": list(grid.size), "step": grid.step}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=32768)
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--verified", action="store_true", help="the caller verified every chunk: no marker read")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.verified)
        return
    workdir = Path(tempfile.mkdtemp(prefix="report-memory-"))
    try:
        spec = setup(workdir, args.side, args.levels)
        command = [sys.executable, __file__, "--child", str(spec)] + (["--verified"] if args.verified else [])
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    full = args.side * args.side * (1 + 3 * 4)
    result["full_resolution_section_gib"] = round(full / 2 ** 30, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
