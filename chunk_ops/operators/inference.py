"""``inference``: the network over a task's box, with exactly the job runner's result.

The job's region of interest fixes one global patch grid (:class:`chunk_ops.blend.PatchGrid`).
For a task box B this operator evaluates every patch of that grid whose output
touches B, sums ``window * prediction`` and divides by the grid's weight sum over
B, so the blended values equal what ``chunk-ops run`` writes, whatever the task
size (chunkflow instead crops a margin off each chunk's own patches, which only
approximates a seamless result).  The input chunk must cover those patches'
input::

        patches touching B      |<-- p -->|        |<-- p -->|
        their input              <m>|<----- B ----->|<m>
        (p: output patch - 1 at most on each side, m: the model's context margin)

so load it with ``--expand-margin`` of output patch - 1 + margin per axis (the
error says so when it is short).  Patches along task borders are evaluated by each
task they touch: chunked this way, a run costs more patches than the two-stage job
runner, which evaluates each exactly once.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from ..blend import PatchGrid
from ..geometry import Box, Vec3
from .base import ChainTask, Chunk, Operator, input_chunk_option, operator, output_chunk_option, per_task, triple_option


def _with_options(document: dict, options: dict) -> dict:
    """The job document with the explicitly given options in place of its fields."""
    if not isinstance(document, dict):
        return document  # parse_spec says what is wrong with it
    doc = copy.deepcopy(document)
    model, inference = doc.setdefault("model", {}), doc.setdefault("inference", {})
    fields = {"model": ("path", model), "definition": ("definition", model),
              "input_patch": ("input_patch", model), "output_patch": ("output_patch", model),
              "overlap": ("overlap", inference), "blend": ("blend", inference),
              "engine": ("engine", inference), "batch_size": ("batch_size", inference)}
    for option, value in options.items():
        if value is not None:
            key, section = fields[option]
            section[key] = value.to_list() if isinstance(value, Vec3) else value
    return doc


def _input_needed(grid: PatchGrid, patch: Vec3, margin: Vec3, box: Box) -> tuple[tuple, Box, Box]:
    """Patch origins (x, y, z lists) whose output touches ``box``, the output they cover, and its input."""
    origins = grid.origins_reaching(box)
    covered = Box(Vec3(*(int(o[0]) for o in origins)), Vec3(*(int(o[-1]) for o in origins)) + patch)
    return origins, covered, covered.grow(margin)


@operator("inference")
@click.option("--job", "job_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="job spec (JSON): model, patches, overlap, blend, engine; its roi fixes the patch grid")
@click.option("--model", help="model file, in place of the job's model.path")
@click.option("--definition", help="network class (format pytorch), in place of the job's model.definition")
@triple_option("--input-patch", help="in place of the job's model.input_patch")
@triple_option("--output-patch", help="in place of the job's model.output_patch")
@triple_option("--overlap", help="in place of the job's inference.overlap")
@click.option("--blend", help="bump, gaussian or constant, in place of the job's inference.blend")
@click.option("--engine", help="auto, pytorch, openvino or onnxruntime, in place of the job's inference.engine")
@click.option("--batch-size", type=int, help="patches per forward pass, in place of the job's inference.batch_size")
@input_chunk_option
@output_chunk_option
def inference(job_file: str, input_name: str, output_name: str, **options) -> Operator:
    """Run the job's network over each task's box: the job runner's blended output, as a chunk.

    The input chunk must hold the task box grown by output patch - 1 + the model's
    context margin (load it with --expand-margin).
    """
    from ..blend import window_3d
    from ..job import Job, load_job_document
    from ..stages import ChunkStats, cast_output, normalize_input, predict_into

    try:
        document = load_job_document(Path(job_file).read_text())
    except OSError as e:
        raise click.ClickException(f"inference: cannot read job spec {job_file!r}: {e.strerror}") from None
    job = Job.open(_with_options(document, options))
    model = job.spec.model
    predictor = job.predictor  # loaded and checked once, here
    window = window_3d(job.blend, model.output_patch)
    enough = model.output_patch - 1 + model.margin
    done, tasks = ChunkStats(), 0

    def infer(task: ChainTask) -> ChainTask:
        nonlocal tasks
        box, chunk = task.box, task.chunk(input_name)
        if not job.roi.contains(box):
            raise ValueError(f"the task box is not inside the job's roi {job.roi}, which the patch grid covers")
        if chunk.array.shape[0] != model.in_channels:
            raise ValueError(f"chunk {input_name!r} has {chunk.array.shape[0]} channels, "
                             f"the model takes {model.in_channels}")
        origins, covered, needed = _input_needed(job.grid, model.output_patch, model.margin, box)
        if not chunk.box.contains(needed):
            below, above = box.start - needed.start, needed.stop - box.stop
            have_below, have_above = box.start - chunk.box.start, chunk.box.stop - box.stop
            raise ValueError(
                f"chunk {input_name!r} covers {chunk.box}, but this task's patches read {needed}: a margin of "
                f"{below.to_list()} below and {above.to_list()} above the task box, it has {have_below.to_list()} "
                f"and {have_above.to_list()}; load it with --expand-margin {' '.join(map(str, enough))} "
                f"(output patch - 1 + the model's margin: enough for every task)")
        image = normalize_input(chunk.array[(slice(None), *needed.to_zyx_slices(chunk.box))])
        acc = np.zeros((model.out_channels, *covered.shape.zyx()), np.float64)
        stats = ChunkStats(voxels=box.size)
        predict_into(predictor, image, origins, covered.start, acc, window, stats)
        values = acc[(slice(None), *box.to_zyx_slices(covered))] / job.grid.weight_sum(box, job.blend)
        task.chunks[output_name] = Chunk(cast_output(values, job.spec.output_dtype), box, chunk.resolution)
        done.add(stats)
        tasks += 1
        return task

    def run(stream: Iterator[ChainTask]) -> Iterator[ChainTask]:
        yield from per_task("inference", infer)(stream)
        # one JSON line on stderr: what the network did (patches evaluated: the cost)
        click.echo(json.dumps({"operator": "inference", "tasks": tasks, "patches": done.patches,
                               "voxels": done.voxels, "patches_in_job_grid": len(job.grid),
                               "engine": predictor.engine.name}), err=True)
    return run
