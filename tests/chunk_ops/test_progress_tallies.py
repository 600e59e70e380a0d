"""Progress at O(workers) per poll: the workers' tallies, the stage watch's rules, verification."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from chunk_ops.job import Job
from chunk_ops.pipeline import finish, run_job
from chunk_ops.queues import QueueCounts
from chunk_ops.queues.stages import StageQueues
from chunk_ops.submit import StageIncomplete, StageWatch, enqueue_stage, report_from_markers, run_report
from chunk_ops.tally import COMPACTED, progress_prefix, read_stage_tally
from chunk_ops.worker import Worker, WorkerConfig


def _prepared(make_spec, **kw) -> Job:
    job = Job.open(make_spec(chunk=(16, 16, 4), **kw))
    job.prepare()
    return job


def _queues(tmp_path: Path) -> StageQueues:
    return StageQueues(f"file://{tmp_path}/{uuid.uuid4().hex[:8]}.sqlite", create=True)


def _work(queues: StageQueues, stages=(1, 2), **kw):
    config = dict(idle_exit_s=0.5, visibility_timeout_s=30.0, retries=0, backoff_s=0.1, stages=stages)
    config.update(kw)
    return Worker(WorkerConfig(queues.url, **config), queues).run()


def test_tallies_count_each_chunk_once_and_give_the_markers_report(make_spec, tmp_path):
    job = _prepared(make_spec)
    queues = _queues(tmp_path)
    enqueue_stage(job, queues, 1)
    _work(queues, stages=(1,), max_tasks=3)
    _work(queues, stages=(1,))
    enqueue_stage(job, queues, 2)
    _work(queues, stages=(2,))
    # a redelivery of a chunk already done: skipped, and not counted again
    enqueue_stage(job, queues, 1)  # sends nothing: every chunk has its marker
    queues.of(1).send_batch([json.dumps({"v": 1, "job": job.id, "spec": job.spec_url, "stage": 1,
                                         "box": job.plan[0].to_dict()}, separators=(",", ":"))])
    assert _work(queues, stages=(1,)).skipped == 1
    for stage in (1, 2):
        tally = read_stage_tally(job.job_url, job.stage_folder(stage))
        assert tally.tasks == len(job.plan)
        assert tally.voxels == job.roi.size
    # three worker processes' worth of files for stage 1, one for stage 2 (the skipping worker wrote none)
    assert read_stage_tally(job.job_url, job.stage_folder(1)).files_read == 2
    from_tallies, from_markers = run_report(job).to_dict(), report_from_markers(job).to_dict()
    assert (from_tallies["counted_from"], from_markers["counted_from"]) == ("tallies", "markers")
    for key in ("chunks", "voxels", "patches_evaluated", "redeliveries", "amplification"):
        assert from_tallies[key] == from_markers[key]
    assert from_tallies["per_pool"]["default"]["tasks"] == from_markers["per_pool"]["default"]["tasks"]
    assert from_tallies["stage1"]["patches"] == from_markers["stage1"]["patches"] == len(job.grid)


def test_compaction_folds_exited_workers_and_keeps_the_count(make_spec, tmp_path):
    job = _prepared(make_spec)
    queues = _queues(tmp_path)
    enqueue_stage(job, queues, 1)
    for _ in range(3):
        _work(queues, stages=(1,), max_tasks=2)
    before = read_stage_tally(job.job_url, job.stage_folder(1))
    assert before.files_read == 3 and before.tasks == 6
    compacted = read_stage_tally(job.job_url, job.stage_folder(1), compact=True)
    assert compacted.tasks == 6
    names = os.listdir(Path(job.job_url.removeprefix("file://")) / progress_prefix(job.stage_folder(1)))
    assert names == [COMPACTED]
    _work(queues, stages=(1,))
    after = read_stage_tally(job.job_url, job.stage_folder(1), compact=True)
    assert after.tasks == len(job.plan) and after.files_read == 2  # the compacted file and the new worker's


def test_a_poll_reads_tallies_not_markers_until_they_reach_the_total(make_spec, tmp_path):
    job = _prepared(make_spec)
    queues = _queues(tmp_path)
    enqueue_stage(job, queues, 1)
    watch = StageWatch(job, 1, lambda: queues.counts(1))
    first = watch.poll()
    assert (first.state, first.done, first.listed) == ("running", 0, False)
    _work(queues, stages=(1,), max_tasks=4)
    middle = watch.poll()
    assert (middle.state, middle.done, middle.listed) == ("running", 4, False)
    _work(queues, stages=(1,))
    last = watch.poll()
    assert (last.state, last.done, last.listed) == ("done", len(job.plan), True)


def test_a_tally_over_the_total_is_checked_against_the_markers(make_spec, tmp_path):
    job = _prepared(make_spec)
    queues = _queues(tmp_path)
    enqueue_stage(job, queues, 1)
    _work(queues, stages=(1,))
    missing = job.plan[1]
    marker = Path(job.job_url.removeprefix("file://")) / f"done/stage1/{missing.to_filename()}.json"
    marker.unlink()  # as if two workers finished one chunk and none this one: the sum is right, a marker missing
    queues.of(1).send_batch([json.dumps({"v": 1, "job": job.id, "spec": job.spec_url, "stage": 1,
                                         "box": missing.to_dict()}, separators=(",", ":"))])
    watch = StageWatch(job, 1, lambda: queues.counts(1))
    poll = watch.poll()
    assert (poll.state, poll.done, poll.listed) == ("running", len(job.plan) - 1, True)
    assert watch.missing_boxes() == [(0, missing)]
    _work(queues, stages=(1,))
    poll = watch.poll()
    assert (poll.state, poll.listed) == ("done", False)  # the one missing chunk was looked up on its own


class FlickeringCounts:
    """SQS's approximate counts: eventually consistent, they may read 0 for a moment while
    messages are visible or leased.  Reads the real queue, except on the polls listed."""

    def __init__(self, queues: StageQueues, stage: int, zero_on: set[int]):
        self.queues, self.stage, self.zero_on, self.polls = queues, stage, zero_on, 0

    def __call__(self) -> QueueCounts:
        self.polls += 1
        return QueueCounts(0, 0, 0) if self.polls in self.zero_on else self.queues.counts(self.stage)


def test_one_empty_reading_never_fails_a_stage_whose_tasks_are_queued_or_leased(make_spec, tmp_path):
    job = _prepared(make_spec)
    queues = _queues(tmp_path)
    enqueue_stage(job, queues, 1)
    leased = queues.of(1).receive(2, visibility_timeout=60)  # two chunks leased, the rest visible
    assert len(leased) == 2
    watch = StageWatch(job, 1, FlickeringCounts(queues, 1, zero_on={2, 4, 6}), stall_after_s=0)
    states = [watch.poll().state for _ in range(7)]
    assert states == ["running"] * 7
    # empty on several polls in a row, but for less than stall_after_s: still running
    patient = StageWatch(job, 1, FlickeringCounts(queues, 1, zero_on={1, 2, 3, 4}), stall_after_s=60)
    assert [patient.poll().state for _ in range(5)] == ["running"] * 5
    assert patient.missing is None  # and no marker listing either


def test_a_queue_empty_twice_with_chunks_not_done_is_stalled(make_spec, tmp_path):
    job = _prepared(make_spec)
    queues = _queues(tmp_path)
    enqueue_stage(job, queues, 1)
    _work(queues, stages=(1,), max_tasks=3)
    queues.of(1).purge()  # the rest lost, as if dead-lettered
    watch = StageWatch(job, 1, lambda: queues.counts(1), stall_after_s=0)
    assert watch.poll().state == "running"  # one empty reading is not enough
    stalled = watch.poll()
    assert (stalled.state, stalled.done, stalled.listed) == ("stalled", 3, True)


def test_verification_finds_an_output_block_missing_despite_its_marker(make_spec, tmp_path):
    job = _prepared(make_spec)
    run_job(job)
    finish(job)  # whole
    key = json.loads((Path(job.spec.output_url.removeprefix("file://")) / "info").read_text())["scales"][0]["key"]
    blocks = sorted((Path(job.spec.output_url.removeprefix("file://")) / key).iterdir())
    victim = blocks[len(blocks) // 2]
    victim.unlink()
    with pytest.raises(StageIncomplete, match=victim.name.removesuffix(".gz")):
        finish(job)


def test_validate_warns_about_a_job_of_millions_of_chunks_and_names_a_chunk_size(make_spec, tmp_path):
    from chunk_ops.geometry import Box, Vec3
    from chunk_ops.pipeline import MANY_CHUNKS, plan_warnings
    from chunk_ops.volumes import create_volume

    spec = make_spec()
    assert plan_warnings(Job.open(spec)) == []
    huge = f"file://{tmp_path}/huge"  # an info file only: a virtual volume of 2.7 million chunks
    create_volume(huge, bounds=Box((0, 0, 0), (16 * 150, 16 * 150, 4 * 120)), block_size=Vec3(64, 64, 16),
                  dtype="uint8", num_channels=1, resolution=(4, 4, 40))
    spec["input"]["url"] = huge
    job = Job.open(spec)
    assert len(job.plan) == 150 * 150 * 120 > MANY_CHUNKS
    (warning,) = plan_warnings(job)
    assert warning.startswith("2,700,000 chunks") and "chunk_size [64, 64, 4] gives 173,280 chunks" in warning


def test_a_merge_whose_block_did_not_land_fails_naming_it(make_spec, monkeypatch):
    from chunk_ops.stages import run_stage1, run_stage2

    job = _prepared(make_spec)
    chunk = job.plan[0]
    for box in job.contributors(chunk):
        job.mark_done(1, box, {"finished_at": 1.0, "partial_pieces": run_stage1(job, box)[1]["partial_pieces"]})
    stats, extra = run_stage2(job, chunk)
    assert extra["blocks"] == len(job.output.block_names(chunk)) == 8  # 16x16x4 chunks of 8x8x2 blocks
    # a store that drops one block of the write (an eventually consistent or failing backend)
    lost = job.output.block_names(chunk)[1]
    folder = Path(job.spec.output_url.removeprefix("file://"))
    write = type(job.output)._write_aligned

    def drop_one(self, box, data):
        write(self, box, data)
        next(folder.glob(lost + "*")).unlink()

    monkeypatch.setattr(type(job.output), "_write_aligned", drop_one)
    with pytest.raises(RuntimeError, match=lost):
        run_stage2(job, chunk)


def test_above_the_listing_limit_the_merges_counts_are_the_proof(make_spec, monkeypatch):
    import chunk_ops.submit as submit

    job = _prepared(make_spec)
    run_job(job)
    monkeypatch.setattr(submit, "LIST_BLOCKS_UP_TO", 10)
    listed = []
    real = type(job.output).stored_block_names
    monkeypatch.setattr(type(job.output), "stored_block_names", lambda self, p="": listed.append(p) or real(self, p))
    assert submit.check_output_blocks(job) == len(job.output.block_names(job.roi))
    assert listed == []  # the tallies added up: nothing listed
    tally = Path(job.job_url.removeprefix("file://")) / "progress" / job.stage_folder(2)
    for name in tally.iterdir():
        name.unlink()  # tallies lost: the layer is listed after all
    assert submit.check_output_blocks(job) == len(job.output.block_names(job.roi))
    assert listed == ["0-8_", "8-16_", "16-24_", "24-32_", "32-40_"]  # a listing per column of 8-voxel blocks
