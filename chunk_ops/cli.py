"""The ``chunk-ops`` command line.

    chunk-ops validate JOB.json      check a job: volumes, model, output/scratch/queue access; the plan
                                     with its output and scratch bytes and hours here; writes nothing
    chunk-ops run JOB.json [--workers N]   run a job here (this process, or a local pool): every step,
                                     segmentation, pyramid and report included
    chunk-ops submit JOB.json --queue URL  prepare the job and enqueue a stage's tasks
    chunk-ops worker --queue URL     lease and do tasks until the queue stays empty
    chunk-ops status JOB.json --queue URL  done of total, queue depths, throughput, ETA
    chunk-ops finish JOB.json --queue URL  after the merge: verify, remove scratch, segment, pyramid, report
    chunk-ops chain OP [OPTS] OP ...  chunk operators composed in one command (as in chunkflow)
    chunk-ops view LAYER...          a local Neuroglancer viewer on layers
    chunk-ops sample URL --shape X Y Z [--labels URL]  synthetic EM (and its ground truth)
    chunk-ops evaluate SEG_URL TRUTH_URL   adapted Rand error of a segmentation
    chunk-ops export-onnx JOB.json OUT.onnx   the job's PyTorch model as ONNX
    chunk-ops demo --workdir DIR     sample volume + demo model + job, then run it
    chunk-ops train OUT.pt           train the bundled RSUNet on synthetic EM (or given layers)

stdout carries only each command's result (``--json``: as JSON); progress and events
go to stderr.  A user's mistake (a bad value, a missing layer or credential, a place
that cannot be written) is one line naming the value, exit status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .geometry import Vec3

CONFIRM_ABOVE = 10_000  # chunks `submit` enqueues without asking (env CHUNK_OPS_CONFIRM_ABOVE)


class JobFile(click.ParamType):
    """A job spec JSON file, parsed (not yet validated)."""

    name = "job.json"

    def convert(self, value, param, ctx):
        from .job import load_job_document

        try:
            return load_job_document(Path(value).read_text())
        except OSError as e:
            self.fail(f"cannot read job spec {value!r}: {e.strerror}", param, ctx)
        except ValueError as e:
            self.fail(f"{value}: {e}", param, ctx)


class Commands(click.Group):
    """Turns the errors a user can cause into one line (``Error: ...``, exit 1), not a traceback.

    ValueError covers the project's own (SpecError, VolumeError, ModelError, StorageError,
    TaskError), whose messages name the bad value; a run that cannot complete raises
    RuntimeError (StageIncomplete); OSError and botocore's errors come from storage.
    Anything else is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit):  # Exit (from --help) is a RuntimeError
            raise
        except (ValueError, RuntimeError, OSError) as e:
            raise click.ClickException(_one_line(e)) from None
        except Exception as e:
            if type(e).__module__.startswith(("botocore", "google.auth")):
                from .storage import describe_cloud_error

                raise click.ClickException(describe_cloud_error(e)) from None
            raise


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _output(result: dict, as_json: bool, human: str) -> None:
    """The command's result on stdout: JSON with --json, else the human summary."""
    click.echo(json.dumps(result, indent=2) if as_json else human)


def _summary(job) -> dict:
    return {
        "job_id": job.id,
        "roi": job.roi.to_dict(),
        "chunks": len(job.plan),
        "chunk_grid": job.plan.grid_shape.to_list(),
        "patches": len(job.grid),
        "output": job.spec.output_url,
    }


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _run_summary(report: dict) -> str:
    lines = [
        f"job {report['job_id']}: {report['chunks']} chunks done in {report['wall_s']:.1f} s, "
        f"amplification {report['amplification']:.2f}, {report['redeliveries']} redeliveries, "
        f"{report['dead_letters']} dead letters",
    ]
    if report.get("segmentation"):
        seg = report["segmentation"]
        quality = f", adapted Rand error {seg['adapted_rand_error']}" if "adapted_rand_error" in seg else ""
        lines.append(f"segmentation: {seg['segments']} segments in {seg['url']}{quality}")
    if report.get("pyramid_chunks"):
        lines.append(f"pyramid: {len(report['pyramid_chunks'])} levels")
    if report.get("reports"):
        lines.append(f"report: {report['reports'].get('report.html')}")
    if report.get("neuroglancer"):
        lines.append(f"view: {report['neuroglancer']}")
    return "\n".join(lines)


json_option = click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
job_queue_option = click.option(
    "--queue", "queue_url", help="queue URL (default: the job's queue, else an embedded one beside the output)")


@click.group(cls=Commands)
@click.version_option(package_name="chunk-ops")
def main() -> None:
    """Run 3D ConvNets over huge precomputed volumes, chunk by chunk, seamlessly."""


@main.command()
@click.argument("job", type=JobFile())
@json_option
def validate(job: dict, as_json: bool) -> None:
    """Check JOB without writing anything: volumes, model (one forward pass), access to the
    output, scratch and queue; print the plan with its bytes and time at this machine's rate."""
    from . import pipeline
    from .progress import duration_text

    opened = pipeline.validate(job)
    plan = pipeline.estimate(opened)
    result = {"valid": True, **_summary(opened), "engine_here": opened.predictor.engine.name, **plan.to_dict()}
    _output(result, as_json, (
        f"valid: job {opened.id}, {plan.chunks} chunks ({plan.chunks_done} done), {plan.patches} patches\n"
        f"output {opened.spec.output_url}: {_bytes(plan.output_bytes)} uncompressed (pyramid and segmentation included)\n"
        f"scratch: up to {_bytes(plan.scratch_bytes)} of partial sums between the stages\n"
        f"time: {duration_text(plan.hours_here * 3600)} for one worker like this machine "
        f"({plan.patches_per_s} patches/s, engine {result['engine_here']})"
        + "".join(f"\nwarning: {w}" for w in plan.warnings)
    ))


@main.command()
@click.argument("job", type=JobFile())
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="worker processes on a queue; 0 runs everything in this process")
@job_queue_option
@json_option
def run(job: dict, workers: int, queue_url: str | None, as_json: bool) -> None:
    """Run JOB on this machine: stage 1, the merge, then segmentation, pyramid and report.
    Chunks already done (a rerun) are skipped."""
    from . import pipeline
    from .progress import event

    opened = pipeline.validate(job, queue_url=queue_url, probe_queue=bool(workers))
    event(f"job {opened.id}: {len(opened.plan)} chunks, {len(opened.grid)} patches -> {opened.spec.output_url}")
    report = pipeline.run_job(opened, workers=workers, queue_url=queue_url).to_dict()
    _output(report, as_json, _run_summary(report))


@main.command()
@click.argument("job", type=JobFile())
@job_queue_option
@click.option("--stage", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option("--max-receives", type=click.IntRange(min=1), default=5, show_default=True,
              help="receives before a task goes to the dead-letter queue (new queues; an existing "
                   "queue keeps its limit)")
@click.option("--yes", is_flag=True, help="enqueue without asking, however many chunks")
@click.option("--confirm-above", type=click.IntRange(min=0), envvar="CHUNK_OPS_CONFIRM_ABOVE",
              default=CONFIRM_ABOVE, show_default=True,
              help="ask before enqueuing more chunks than this (env CHUNK_OPS_CONFIRM_ABOVE)")
@json_option
def submit(job: dict, queue_url: str | None, stage: str, max_receives: int, yes: bool, confirm_above: int,
           as_json: bool) -> None:
    """Prepare JOB (stage 1) and enqueue the stage's tasks that are not done yet."""
    from . import pipeline
    from .queues.stages import StageQueues
    from .submit import default_queue_url

    opened = pipeline.validate(job, queue_url=queue_url)
    url = queue_url or default_queue_url(opened)
    todo = len(opened.plan) - int(opened.done_mask(int(stage)).sum())
    if todo > confirm_above and not yes:
        question = f"enqueue {todo} stage-{stage} tasks of job {opened.id} on {url}?"
        if not sys.stdin.isatty():
            raise click.ClickException(f"refusing to enqueue {todo} chunks (more than --confirm-above "
                                       f"{confirm_above}) without confirmation: add --yes")
        click.confirm(question, abort=True, err=True)
    if stage == "1":
        pipeline.prepare(opened)
    sent = pipeline.enqueue(opened, StageQueues(url, create=True, max_receives=max_receives), int(stage))
    result = {**_summary(opened), "queue": url, "stage": int(stage), "sent": sent,
              "skipped_done": len(opened.plan) - sent, "spec_url": opened.spec_url}
    _output(result, as_json, f"sent {sent} stage-{stage} tasks of job {opened.id} to {url} "
                             f"({result['skipped_done']} chunks already done); spec {opened.spec_url}")


def _open_worker_queues(url: str, create: bool):
    """The stage queues; with ``create``, made first if missing (existing ones keep their receive limit)."""
    from .queues.stages import StageQueues

    try:
        return StageQueues(url)
    except ValueError:
        if not create:
            raise
        return StageQueues(url, create=True)


@main.command()
@click.option("--queue", "queue_url", required=True, help="sqs://NAME or file:///path/queue.sqlite")
@click.option("--visibility-timeout", type=float, default=60.0, show_default=True,
              help="lease length in seconds; a heartbeat renews it while a task runs")
@click.option("--idle-exit", type=float, default=30.0, show_default=True,
              help="exit after the queue stays empty this many seconds ('inf': a standing worker)")
@click.option("--create-queue", is_flag=True,
              help="make the queue (and its dead-letter queue) if it does not exist yet: a standing "
                   "worker may start before the first job is submitted")
@click.option("--grace", type=float, default=25.0, show_default=True,
              help="after SIGTERM, seconds to finish the current task before giving it back")
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, help="exit after this many tasks")
@click.option("--pool", envvar="CHUNK_OPS_POOL", default="default", show_default=True,
              help="pool name recorded with each task (env CHUNK_OPS_POOL)")
@click.option("--tasks-in-flight", type=click.IntRange(min=0), default=0, show_default=True,
              help="tasks at once, sharing the model, so reads and writes overlap the network; "
                   "0: 2 on a machine with a CUDA GPU, else 1")
@click.option("--stages", default="1,2,3,4,5,6", show_default=True,
              help="stages this worker serves (1: network, 2: merge, 3-6: post-processing, served "
                   "together: blockwise segmentation and the pyramid); GPU workers: 1")
@click.option("--task-deadline", type=click.FloatRange(min=0, min_open=True), default=7200.0, show_default=True,
              help="seconds after which a task (e.g. a hung read) is given back and the worker exits 75")
@click.option("--spec-prefix", "spec_prefixes", multiple=True, envvar="CHUNK_OPS_SPEC_PREFIXES",
              help="only open job specs under this URL prefix (repeat; env CHUNK_OPS_SPEC_PREFIXES, "
                   "space-separated); none: any spec a message names")
@click.option("--threads", type=click.IntRange(min=1), envvar="CHUNK_OPS_THREADS", default=None,
              help="CPU threads for the network (env CHUNK_OPS_THREADS; the local pool and pods set it from "
                   "their share of cores); default: every core of this machine")
def worker(queue_url: str, visibility_timeout: float, idle_exit: float, create_queue: bool, grace: float,
           max_tasks: int | None, pool: str, tasks_in_flight: int, stages: str, task_deadline: float,
           spec_prefixes: tuple[str, ...], threads: int | None) -> None:
    """Lease tasks from the queue and do them until it stays empty."""
    import logging

    from .worker import Worker, WorkerConfig

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # events carry their time
    try:
        served = tuple(sorted({int(x) for x in stages.split(",") if x.strip()}))
    except ValueError:
        raise click.BadParameter(f"{stages!r} is not a comma-separated list of stages (1 to 6)") from None
    w = Worker(WorkerConfig(queue_url, visibility_timeout_s=visibility_timeout, idle_exit_s=idle_exit,
                            grace_s=grace, max_tasks=max_tasks, pool=pool, tasks_in_flight=tasks_in_flight,
                            stages=served, task_deadline_s=task_deadline, spec_prefixes=spec_prefixes,
                            threads=threads),
               _open_worker_queues(queue_url, create_queue))
    w.install_signal_handlers()
    w.run()


@main.command()
@click.argument("job", type=JobFile())
@job_queue_option
@json_option
def status(job: dict, queue_url: str | None, as_json: bool) -> None:
    """Visible, in-flight and dead-lettered tasks, done of total, throughput, ETA."""
    from .job import Job
    from .queues.stages import StageQueues
    from .submit import default_queue_url, job_status

    opened = Job.open(job)
    state = job_status(opened, StageQueues(queue_url or default_queue_url(opened)))
    from .queues.stages import POST_STAGES
    from .task import STAGE_NAMES

    lines = [f"job {state.job_id}"]
    for stage, progress in state.stages.items():
        counts = state.queues[stage]
        eta = f", ETA {progress.eta_s:.0f} s" if progress.eta_s else ""
        queue = "post queue (stages 3-6)" if stage in POST_STAGES else "queue"
        lines.append(f"stage {stage} ({STAGE_NAMES[stage]}): {progress.done}/{progress.total} tasks done; {queue}: "
                     f"{counts.visible} waiting, {counts.in_flight} leased, {counts.dead} dead{eta}")
    lines += [f"dead letter: {body}" for body in state.dead_letters]
    _output(state.to_dict(), as_json, "\n".join(lines))


@main.command()
@click.argument("job", type=JobFile())
@job_queue_option
@json_option
def finish(job: dict, queue_url: str | None, as_json: bool) -> None:
    """After stage 2: verify every chunk, remove the scratch, segment, build the pyramid, write the report."""
    from . import pipeline
    from .job import Job
    from .queues.stages import StageQueues
    from .submit import default_queue_url

    opened = Job.open(job)
    report = pipeline.complete(opened, StageQueues(queue_url or default_queue_url(opened))).to_dict()
    _output(report, as_json, _run_summary(report))


@main.command()
@click.argument("url")
@click.option("--shape", nargs=3, type=int, required=True, help="x y z voxels")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--block-size", nargs=3, type=int, default=(64, 64, 8), show_default=True)
@click.option("--labels", "labels_url", default=None, help="also write the ground-truth segmentation layer here")
@click.option("--force", is_flag=True, help="overwrite layers that exist already")
def sample(url: str, shape, seed: int, block_size, labels_url: str | None, force: bool) -> None:
    """Write a synthetic serial-section EM image layer to URL (e.g. file:///tmp/em)."""
    from .sample import write_sample
    from .volumes import volume_exists

    for layer in (url, labels_url):
        if layer and not force and volume_exists(layer):
            raise click.ClickException(f"a layer exists at {layer} already: add --force to overwrite it")
    vol = write_sample(url, Vec3.of(shape), seed=seed, block_size=block_size, labels_url=labels_url)
    click.echo(f"wrote {url}: bounds {vol.bounds.to_dict()}, resolution {vol.resolution} nm"
               + (f"; ground truth {labels_url}" if labels_url else ""))


@main.command()
@click.argument("segmentation")
@click.argument("truth")
def evaluate(segmentation: str, truth: str) -> None:
    """Adapted Rand error of a SEGMENTATION layer against a TRUTH layer (label 0 ignored)."""
    from .segment import adapted_rand_error

    seg, gt = _read_layer_pair(segmentation, truth)
    click.echo(json.dumps({"adapted_rand_error": round(adapted_rand_error(gt, seg), 4), "voxels": seg.size}))


def _read_layer_pair(url: str, truth_url: str):
    """Two single-channel layers with the same bounds, read whole as (z, y, x) arrays."""
    from .volumes import open_volume

    layer, truth = open_volume(url, 0), open_volume(truth_url, 0)
    if layer.bounds != truth.bounds:
        raise click.ClickException(f"{url} bounds {layer.bounds} differ from {truth_url} bounds {truth.bounds}")
    return layer.read(layer.bounds)[0], truth.read(truth.bounds)[0]


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True)
@click.option("--shape", nargs=3, type=int, default=(512, 512, 48), show_default=True,
              help="sample volume size, x y z")
@json_option
def demo(workdir: Path, shape, as_json: bool) -> None:
    """Make a sample volume and the demo network, write a job spec, run it."""
    from . import pipeline
    from .models.demo import write_demo_job
    from .sample import write_sample

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    image_url = f"file://{workdir}/image"
    truth_url = f"file://{workdir}/truth"
    write_sample(image_url, Vec3.of(shape), seed=1, labels_url=truth_url)
    job_doc = write_demo_job(workdir, image_url, f"file://{workdir}/affinities", truth_url)
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job_doc, indent=2) + "\n")
    click.echo(f"job spec: {job_path}", err=True)
    opened = pipeline.validate(job_doc)
    report = pipeline.run_job(opened).to_dict()
    _output(report, as_json, _run_summary(report))


@main.command("export-onnx")
@click.argument("job_doc", metavar="JOB.json", type=JobFile())
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def export_onnx_command(job_doc: dict, out: Path) -> None:
    """Write the job's PyTorch model as ONNX (batch dynamic, the job's patch fixed)."""
    from .models.export import export_onnx
    from .models.loading import read_model_bytes, torch_module
    from .spec import SpecError, parse_spec

    spec = parse_spec(job_doc)
    if spec.model.format == "onnx":
        raise SpecError(f"model {spec.model.path!r} is ONNX already")
    module = torch_module(spec.model, read_model_bytes(spec.model.path))
    data = export_onnx(module, spec.model.in_channels, spec.model.input_patch.zyx())
    out.write_bytes(data)
    click.echo(f"wrote {out} ({len(data)} bytes); in the job spec: model.format 'onnx', model.path '{out}'")


@main.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", type=int, default=None, help="optimizer steps [default: TrainConfig.steps]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image", "images", multiple=True, help="image layer URL (repeat); default: synthetic EM")
@click.option("--labels", "labels", multiple=True, help="ground-truth layer URL, one per --image")
def train(out: Path, steps: int | None, seed: int, images, labels) -> None:
    """Train the bundled RSUNet (affinities) on the CPU; write OUT and OUT's .json record.

    The same command on the same PyTorch build gives the same weights.
    """
    import dataclasses
    import time

    import torch

    from .train import TrainConfig, config_dict, synthetic_volumes
    from .train import train as run_training

    if len(images) != len(labels):
        raise click.BadParameter(f"{len(images)} --image but {len(labels)} --labels; give one of each per volume")
    cfg = TrainConfig(seed=seed)
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    started = time.perf_counter()
    if images:
        volumes = [_read_layer_pair(image_url, labels_url) for image_url, labels_url in zip(images, labels)]
        cfg = dataclasses.replace(cfg, synthetic_seeds=())
    else:
        volumes = synthetic_volumes(cfg)
    net = run_training(volumes, cfg, log=lambda line: click.echo(line, err=True))  # ValueError: one line
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    record = {
        "command": "chunk-ops train " + " ".join(sys.argv[2:]),
        "config": config_dict(cfg),
        "data": list(zip(images, labels)) or "synthetic EM, seeds " + ", ".join(map(str, cfg.synthetic_seeds)),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    click.echo(json.dumps(record, indent=2))


from .view import VIEWER_PORT  # noqa: E402  (light: neuroglancer loads when a viewer starts)


@main.command()
@click.argument("layers", nargs=-1, required=True, metavar="LAYER [LAYER...]")
@click.option("--port", type=click.IntRange(0, 65535), default=VIEWER_PORT, show_default=True,
              help="viewer port (the one run reports name); 0: any free port")
@click.option("--bind", default="127.0.0.1", show_default=True, help="address to serve on")
@click.option("--no-browser", is_flag=True, help="only print the viewer URL")
def view(layers: tuple[str, ...], port: int, bind: str, no_browser: bool) -> None:
    """Show LAYERs (URLs) in Neuroglancer served from here; print its URL; serve until Ctrl-C."""
    from .view import serve

    serve(list(layers), bind=bind, port=port, open_browser=not no_browser)


def _add_chain() -> None:
    from .operators.base import load_all

    main.add_command(load_all())


_add_chain()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
