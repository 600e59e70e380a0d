"""The core invariant: a chunked two-stage run equals a whole-volume single pass."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

from chunk_ops.job import Job
from chunk_ops.pipeline import run_job
from chunk_ops.stages import marker_record, reference_pass, run_stage1, run_stage2
from chunk_ops.volumes import open_volume

CASES = {
    # region 40x36x12 is no multiple of the chunk (16,16,4) nor of the patch (12,12,4)
    "region-not-multiple": dict(),
    "roi-inside-volume": dict(roi=((3, 5, 1), (37, 30, 11))),
    "anisotropic-patch": dict(input_patch=(16, 8, 3), overlap=(6, 2, 1), chunk=(24, 16, 6), block=(8, 8, 2)),
    "three-channels": dict(out_channels=3),
    "network-output-smaller": dict(net="ValidConvNet", input_patch=(14, 14, 6), output_patch=(10, 10, 2),
                                   overlap=(4, 4, 0)),
    "cropped-output-patch": dict(input_patch=(14, 14, 6), output_patch=(8, 8, 4), overlap=(2, 2, 2)),
    # patch 12x12x4, overlap 4x4x2: stride 8x8x2; chunks 1x, 2.5x and 4x that stride
    "chunk-1x-stride": dict(chunk=(8, 8, 2), block=(4, 4, 2)),
    "chunk-2.5x-stride": dict(chunk=(20, 20, 5), block=(4, 4, 1)),
    "chunk-4x-stride": dict(chunk=(32, 32, 8), block=(8, 8, 4)),
    "gaussian-window": dict(blend="gaussian"),
    "constant-window": dict(blend="constant"),
}


def read_output(job: Job) -> np.ndarray:
    return open_volume(job.spec.output_url, 0).read(job.roi)


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_run_equals_whole_volume_reference(make_spec, case):
    job = Job.open(make_spec(**CASES[case]))
    assert len(job.plan) > 1, "the case must span several chunks"
    report = run_job(job)
    expected = reference_pass(job)
    got = read_output(job)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5
    assert report.amplification == 1.0


def test_uint8_output_is_the_quantized_reference(make_spec):
    job = Job.open(make_spec(dtype="uint8"))
    run_job(job)
    expected = np.round(np.clip(reference_pass(job), 0, 1) * 255)
    got = read_output(job).astype(np.float64)
    # a value within float rounding of a .5 step may round either way
    assert np.abs(got - expected).max() <= 1
    assert np.mean(got != expected) < 1e-3


def _layer_bytes(url: str) -> dict[str, bytes]:
    root = Path(url.removeprefix("file://"))
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*")) if p.is_file() and "jobs" not in p.parts
    }


def test_random_order_and_repeated_chunks_change_no_byte(make_spec):
    spec = make_spec(chunk=(8, 8, 2), block=(4, 4, 2), output="in-order")
    spec["postprocess"] = {"pyramid_levels": 0}  # the layer alone, as the hand-run stages below write it
    in_order = Job.open(spec)
    run_job(in_order)

    shuffled = Job.open(make_spec(chunk=(8, 8, 2), block=(4, 4, 2), output="shuffled"))
    shuffled.prepare()
    rng = random.Random(7)
    order = list(range(len(shuffled.plan)))
    rng.shuffle(order)
    for i in order + order[:3]:  # three chunks done twice, each marked done as a worker does
        stats, extra = run_stage1(shuffled, shuffled.plan[i])
        shuffled.mark_done(1, shuffled.plan[i], {**stats.to_dict(), **extra, "finished_at": time.time()})
    rng.shuffle(order)
    for i in order[:5] + order:  # five merges done twice, once before all the others
        run_stage2(shuffled, shuffled.plan[i])

    a, b = _layer_bytes(in_order.spec.output_url), _layer_bytes(shuffled.spec.output_url)
    assert len(a) > 10
    assert a == b


class CountingEngine:
    """Wraps an engine and counts the patches the network itself sees."""

    def __init__(self, engine):
        self.engine, self.name, self.calls, self.patches = engine, engine.name, 0, 0

    def __call__(self, batch):
        self.calls += 1
        self.patches += len(batch)
        return self.engine(batch)


def test_every_patch_is_computed_exactly_once(make_spec):
    job = Job.open(make_spec(chunk=(8, 8, 2), block=(4, 4, 2), batch_size=1))
    counter = CountingEngine(job.predictor.engine)
    job.predictor.engine = counter
    report = run_job(job)
    distributed = counter.patches

    counter.patches = 0
    reference_pass(job)
    single_pass = counter.patches

    assert distributed == single_pass == len(job.grid)
    assert report.amplification == distributed / single_pass == 1.0
    # a 1x-stride chunk grid is where overlapping-chunk schemes pay the most
    assert len(job.plan) >= 20


@pytest.mark.parametrize("blend", ["bump", "gaussian", "constant"])
@pytest.mark.parametrize(
    "scales,biases", [((1.0,), (0.0,)), ((2.0,), (1.0,)), ((1.0, 2.0, -1.0), (0.0, 1.0, 0.5))],
    ids=["identity", "2x+1", "three-affine-channels"],
)
def test_closed_form_networks_give_exact_volumes(make_spec, blend, scales, biases):
    spec = make_spec(net="Affine", net_kwargs={"scales": list(scales), "biases": list(biases)},
                     out_channels=len(scales), blend=blend)
    job = Job.open(spec)
    run_job(job)
    x = open_volume(spec["input"]["url"], 0).read(job.roi).astype(np.float64) / 255.0
    expected = np.concatenate([s * x + b for s, b in zip(scales, biases)])
    assert np.abs(read_output(job) - expected).max() <= 1e-6


def test_closed_form_with_cropping_network(make_spec):
    """A network that crops its own output (valid convolutions) still lands in place."""
    spec = make_spec(net="Affine", net_kwargs={"scales": [2.0], "biases": [1.0], "crop": [1, 2, 3]},
                     input_patch=(14, 12, 6), output_patch=(8, 8, 4), overlap=(2, 4, 1))
    job = Job.open(spec)
    run_job(job)
    x = open_volume(spec["input"]["url"], 0).read(job.roi).astype(np.float64) / 255.0
    assert np.abs(read_output(job) - (2 * x + 1)).max() <= 1e-6


def test_a_merge_reads_only_the_pieces_inside_its_chunk(make_spec):
    """Stage 1 cuts its partial sum by destination chunk; stage 2 reads only its own
    pieces, and the pieces of a partial tile it exactly."""
    job = Job.open(make_spec(chunk=(8, 8, 2), block=(4, 4, 2)))
    job.prepare()
    for chunk in job.plan:
        stats, extra = run_stage1(job, chunk)
        job.mark_done(1, chunk, marker_record(job, 1, stats, extra, started=time.time(), pool="test",
                                              receive_count=1))
    for chunk in job.plan:
        pieces, part = job.partial_pieces(chunk), job.partial_box(chunk)
        if part is None:  # no patch origin in this chunk
            assert pieces == []
            continue
        assert sum(piece.size for _, piece in pieces) == part.size  # a tiling: no overlap, no gap
        assert all(dest.contains(piece) and part.contains(piece) for dest, piece in pieces)
    read: list[str] = []
    get = job.scratch.get
    job.scratch.get = lambda name: (read.append(name), get(name))[1]
    chunk = job.plan[len(job.plan) // 2]
    run_stage2(job, chunk)
    own = f"/{chunk.to_filename()}.npy"
    assert read and all(name.endswith(own) for name in read), read
    reaching = [n for n in job.contributors(chunk) if (p := job.partial_box(n)) is not None and p.intersects(chunk)]
    assert len(read) == len(reaching) > 1
