"""A job opened against its volumes and model: validation, preparation, layout.

:meth:`Job.open` resolves the spec (region, job id, chunk plan, patch grid) and
checks everything that can be checked without writing; :meth:`Job.prepare`
loads and checks the model, then, and only then, creates the output layer and
stores the spec.  What a job keeps next to its output::

    <output>/info                      the output layer (precomputed)
    <output>/jobs/<job id>/spec.json   the validated spec; tasks refer to it
    <output>/jobs/<job id>/model.sha256  the model's hash (part of the job id)
    <output>/jobs/<job id>/definition.sha256  the network source's hash (format pytorch)
    <output>/jobs/<job id>/scratch/    stage-1 partial sums, removed after the merge
                                       (a spec's scratch_url gets <scratch_url>/<job id>/)
    <output>/jobs/<job id>/done/stage<n>/<chunk id>.json
                                       done markers, with the task's timings (and, for
                                       stage 1, the partial sum's sha256); the pyramid's
                                       (stage 6) under done/stage6/mip<k>/
    <output>/jobs/<job id>/progress/stage<n>/  the workers' tallies (:mod:`.tally`)
                                       (segmentation's stages: stage<n>-<settings hash>)
    <output>/jobs/<job id>/report.json what the run did

The job id hashes everything that changes the output, so a rerun of the same job
finds its done markers and skips those chunks, and a new model gets a new id.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from cloudfiles import CloudFiles

from .blend import BlendMode, PatchGrid
from .engines import ModelError, Predictor
from .geometry import Box, ChunkPlan, Vec3
from .models.loading import load_predictor, read_model_bytes
from .models.loading import model_sha256 as sha256_of
from .models.registry import definition_sha256 as source_sha256_of
from .spec import JobSpec, SpecError, job_id, parse_spec
from .task import PYRAMID
from . import storage
from .volumes import Volume, VolumeError, create_volume, layer_folder, open_volume, volume_exists


class NotReady(RuntimeError):
    """A merge ran before the stage-1 work it needs (retry later)."""


class BadPartial(RuntimeError):
    """A stage-1 partial sum is missing, unreadable or not the bytes its marker recorded."""


@dataclass
class Job:
    spec: JobSpec
    id: str
    roi: Box
    plan: ChunkPlan
    grid: PatchGrid
    input: Volume
    model_sha256: str
    definition_sha256: str | None = None  # the network source's hash, format pytorch
    _model_bytes: bytes | None = field(default=None, repr=False)
    _predictor: Predictor | None = field(default=None, repr=False)
    _predictor_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _pyramid_plans: dict = field(default_factory=dict, repr=False, compare=False)

    # --- opening: every check that writes nothing ---------------------------------
    @classmethod
    def open(cls, spec: JobSpec | dict, *, model_sha256: str | None = None,
             definition_sha256: str | None = None) -> "Job":
        """Resolve and check a job.  ``model_sha256`` and ``definition_sha256``, when known
        (a stored job), spare reading the model until the network is needed; they are
        verified then."""
        if isinstance(spec, dict):
            spec = parse_spec(spec)
        source = open_volume(spec.input_url, spec.input_mip, fill_value=spec.fill_value,
                             fill_missing=spec.fill_missing, blackout_sections=spec.blackout_sections)
        if source.num_channels != spec.model.in_channels:
            raise ModelError(
                f"input layer {spec.input_url} has {source.num_channels} channels but "
                f"model.in_channels is {spec.model.in_channels}"
            )
        roi = spec.roi or source.bounds
        if not source.bounds.contains(roi):
            raise SpecError(
                f"roi {roi.to_dict()} is outside the input volume {spec.input_url} "
                f"(bounds {source.bounds.to_dict()} at mip {spec.input_mip})"
            )
        segmentation = spec.segmentation
        if segmentation["method"] != "none" and segmentation["mode"] == "single" \
                and roi.size > segmentation["max_voxels"]:
            raise SpecError(
                f"postprocess.segmentation covers the region's {roi.size} voxels, more than its "
                f"max_voxels {segmentation['max_voxels']} for mode 'single' (one task segments the "
                f"whole region); use mode 'auto' or 'blockwise' (chunk tasks), or a smaller roi"
            )
        try:
            grid = PatchGrid(roi, spec.model.output_patch, spec.stride)
        except ValueError as e:
            raise SpecError(str(e)) from None
        origin = roi.start
        if volume_exists(spec.output_url):
            origin = _check_existing_output(spec, roi).bounds.start
        model_bytes = None
        if model_sha256 is None:
            model_bytes = read_model_bytes(spec.model.path)
            model_sha256 = sha256_of(model_bytes)
            if spec.model.format == "pytorch":
                definition_sha256 = source_sha256_of(spec.model.definition or "")
        return cls(
            spec=spec,
            id=job_id(spec, model_sha256, roi, definition_sha256),
            roi=roi,
            plan=ChunkPlan(roi, spec.chunk_size, origin),
            grid=grid,
            input=source,
            model_sha256=model_sha256,
            definition_sha256=definition_sha256,
            _model_bytes=model_bytes,
        )

    @staticmethod
    def read_spec(spec_url: str) -> dict:
        """The spec document :meth:`prepare` stored."""
        base, name = spec_url.rsplit("/", 1)
        document = CloudFiles(base).get_json(name)
        if document is None:
            raise SpecError(f"no job spec at {spec_url}")
        return document

    @classmethod
    def from_spec_url(cls, spec_url: str) -> "Job":
        """Open the job whose spec was stored by :meth:`prepare`."""
        document = cls.read_spec(spec_url)
        files = CloudFiles(spec_url.rsplit("/", 1)[0])
        recorded = {r["path"]: r["content"] for r in files.get(["model.sha256", "definition.sha256"])}
        model, definition = (recorded.get(n).decode() if recorded.get(n) else None
                             for n in ("model.sha256", "definition.sha256"))
        if model is None:
            return cls.open(document)
        return cls.open(document, model_sha256=model, definition_sha256=definition)

    @property
    def job_url(self) -> str:
        return f"{layer_folder(self.spec.output_url)}/jobs/{self.id}"

    @property
    def spec_url(self) -> str:
        return f"{self.job_url}/spec.json"

    @property
    def scratch_url(self) -> str:
        """Always the job's own: jobs sharing a scratch_url never see each other's sums."""
        return f"{self.spec.scratch_url}/{self.id}" if self.spec.scratch_url else f"{self.job_url}/scratch"

    @property
    def model_bytes(self) -> bytes:
        """The model file, checked against the hash in the job id: a model changed in
        place after the job was prepared would mix two networks in one output."""
        if self._model_bytes is None:
            data = read_model_bytes(self.spec.model.path)
            if sha256_of(data) != self.model_sha256:
                raise ModelError(
                    f"model file {self.spec.model.path!r} changed since job {self.id} was prepared "
                    f"(sha256 {sha256_of(data)[:12]}..., expected {self.model_sha256[:12]}...); "
                    f"a new model is a new job: submit it again"
                )
            self._model_bytes = data
        return self._model_bytes

    @property
    def predictor(self) -> Predictor:
        """The loaded model, once per job, even when task threads ask at the same time."""
        with self._predictor_lock:
            if self._predictor is None:
                self._predictor = load_predictor(self.spec, self.model_bytes, self.definition_sha256)
            return self._predictor

    @cached_property
    def output(self) -> Volume:
        return open_volume(self.spec.output_url, 0)

    @cached_property
    def scratch(self) -> CloudFiles:
        return storage.files_at(self.scratch_url)

    @property
    def blend(self) -> BlendMode:
        return BlendMode.parse(self.spec.blend)

    # --- preparing: model checked first, then the only writes ------------------
    def prepare(self) -> None:
        """Check the model, create the output layer if needed, store the spec."""
        self.predictor  # loads and runs the model once; raises ModelError
        if not volume_exists(self.spec.output_url):
            create_volume(
                self.spec.output_url, bounds=self.roi, block_size=self.spec.block_size,
                dtype=self.spec.output_dtype, num_channels=self.spec.model.out_channels,
                resolution=self.input.resolution,
            )
        files = CloudFiles(self.job_url)
        files.put_json("spec.json", self.spec.to_dict())
        files.put("model.sha256", self.model_sha256.encode(), compress=None)
        if self.definition_sha256 is not None:
            files.put("definition.sha256", self.definition_sha256.encode(), compress=None)

    # --- stage-1 geometry ------------------------------------------------------------
    def partial_box(self, chunk: Box) -> Box | None:
        """The region a chunk's stage-1 patches cover (None if it holds no origin)."""
        ox, oy, oz = self.grid.origins_in(chunk)
        if not (len(ox) and len(oy) and len(oz)):
            return None
        start = Vec3(int(ox[0]), int(oy[0]), int(oz[0]))
        last = Vec3(int(ox[-1]), int(oy[-1]), int(oz[-1]))
        return Box(start, last + self.spec.model.output_patch)

    def contributors(self, chunk: Box) -> list[Box]:
        """Chunks whose stage-1 partial sums overlap ``chunk``, in plan order.

        A patch reaches at most ``output_patch - 1`` voxels past its chunk, and only
        upwards, so they are the chunk itself and lower neighbours within that reach.
        """
        reach = chunk.start - self.spec.model.output_patch + 1
        return self.plan.chunks_meeting(Box(reach, chunk.start + 1))

    def partial_pieces(self, chunk: Box) -> list[tuple[Box, Box]]:
        """(destination chunk, piece) for each chunk a chunk's partial sum reaches: the
        chunk itself and its upper neighbours, in plan order; each piece is the part of
        the partial inside its destination (empty list if the chunk holds no origin)."""
        part = self.partial_box(chunk)
        if part is None:
            return []
        return [(dest, part.intersection(dest)) for dest in self.plan.chunks_meeting(part)]

    # --- scratch ---------------------------------------------------------------------
    # A partial sum is stored in pieces, one per destination chunk, so a merge reads the
    # parts that fall in its chunk only (whole partials: about 8x the bytes at production
    # chunking, where a chunk has 7 lower neighbours).
    @staticmethod
    def piece_name(source: Box, dest: Box) -> str:
        return f"{ChunkPlan.chunk_id(source)}/{ChunkPlan.chunk_id(dest)}.npy"

    def put_partial(self, chunk: Box, partial: np.ndarray) -> dict[str, str]:
        """Store a chunk's partial sum (over ``partial_box(chunk)``) as its pieces; returns
        each piece's sha256 by destination chunk id, which its stage-1 marker keeps."""
        part = self.partial_box(chunk)
        files, digests = [], {}
        for dest, piece in self.partial_pieces(chunk):
            buf = io.BytesIO()
            np.save(buf, partial[(slice(None), *piece.to_zyx_slices(part))], allow_pickle=False)
            data = buf.getvalue()
            files.append((self.piece_name(chunk, dest), data))
            digests[ChunkPlan.chunk_id(dest)] = hashlib.sha256(data).hexdigest()
        self.scratch.puts(files, compress=None)
        return digests

    def get_piece(self, source: Box, dest: Box, sha256: str) -> np.ndarray:
        """The piece of ``source``'s partial sum inside ``dest``, only if its bytes are the
        ones the source's stage-1 marker recorded."""
        name = self.piece_name(source, dest)
        data = self.scratch.get(name)
        if data is None:
            raise BadPartial(f"stage-1 partial sum piece {name} is missing from {self.scratch_url}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise BadPartial(f"stage-1 partial sum piece {name} has sha256 {actual[:12]}..., its marker "
                             f"recorded {sha256[:12] or 'none'}... (corrupted or torn)")
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise BadPartial(f"stage-1 partial sum piece {name} does not load: {e}") from None

    def remove_scratch(self) -> None:
        """Delete exactly this job's partial sums: pieces named by its own chunks, nothing else."""
        def ours(name: str) -> bool:
            source, _, dest = name.partition("/")
            if not dest:  # a whole partial sum, as jobs begun before the pieces stored them
                return self._plan_chunk(source, ".npy") is not None
            return self._plan_chunk(source, "") is not None and self._plan_chunk(dest, ".npy") is not None

        self.scratch.delete([name for name in self.scratch.list() if ours(name)])
        folder = storage.local_path(self.scratch_url)
        if folder is not None and folder.is_dir():
            storage.sweep_temporaries(folder)
            for sub in folder.iterdir():  # the per-chunk folders a local file system keeps
                if sub.is_dir() and self._plan_chunk(sub.name, "") is not None:
                    with contextlib.suppress(OSError):
                        sub.rmdir()

    def _plan_chunk(self, name: str, suffix: str, plan: ChunkPlan | None = None) -> Box | None:
        """The chunk of ``plan`` (this job's) that a stored name (a chunk id + ``suffix``) stands for, else None."""
        plan = plan or self.plan
        if not name.endswith(suffix) or "/" in name:
            return None
        try:
            box = Box.from_filename(name[: len(name) - len(suffix)])
            plan.index_of(box)
        except (ValueError, IndexError):
            return None
        return box

    def write_report(self, report: dict) -> None:
        CloudFiles(self.job_url).put_json("report.json", report)

    # --- stages' plans ------------------------------------------------------------------
    def stage_plan(self, stage: int, mip: int = 0) -> ChunkPlan:
        """The boxes of a stage's tasks: the job's chunks, or (pyramid) the blocks of mip ``mip``."""
        if stage != PYRAMID:
            return self.plan
        if mip not in self._pyramid_plans:  # each opens the level's info: once per job
            from .downsample import pyramid_plan

            self._pyramid_plans[mip] = pyramid_plan(self.spec.output_url, mip)
        return self._pyramid_plans[mip]

    def stage_levels(self, stage: int) -> list[int]:
        """The mips a stage's tasks are at: [0], or the pyramid's levels (none for a format
        that holds one level)."""
        if stage != PYRAMID:
            return [0]
        from .volumes import mip_count, supports_mips, volume_exists

        url = self.spec.output_url
        if not (supports_mips(url) and volume_exists(url)):
            return []
        # the levels made so far (post-processing adds them before sending their tasks)
        return list(range(1, min(self.spec.postprocess["pyramid_levels"], mip_count(url) - 1) + 1))

    def stage_total(self, stage: int) -> int:
        """Tasks a stage has in all (the pyramid: the blocks of every level)."""
        return sum(len(self.stage_plan(stage, mip)) for mip in self.stage_levels(stage))

    # --- done markers --------------------------------------------------------------
    def stage_folder(self, stage: int) -> str:
        """The folder name of a stage's markers and tallies.  Segmentation's stages (3-5) add
        a hash of the settings that change their labels (postprocess is not in the job id):
        a rerun with a new threshold starts them afresh instead of finding them done."""
        if stage not in (3, 4, 5):
            return f"stage{stage}"
        options = self.spec.segmentation
        key = json.dumps([options["method"], options["threshold"], options["url"]], separators=(",", ":"))
        return f"stage{stage}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    def _stage_prefix(self, kind: str, stage: int, mip: int = 0) -> str:
        """Where a stage's per-chunk files of one kind are: ``done`` markers, ``failed`` records."""
        return f"{kind}/{self.stage_folder(stage)}/" + (f"mip{mip}/" if mip else "")

    def _done_prefix(self, stage: int, mip: int = 0) -> str:
        return self._stage_prefix("done", stage, mip)

    def mark_done(self, stage: int, chunk: Box, record: dict, mip: int = 0) -> None:
        name = f"{self._done_prefix(stage, mip)}{ChunkPlan.chunk_id(chunk)}.json"
        CloudFiles(self.job_url).put_json(name, record)

    def done_record(self, stage: int, chunk: Box, mip: int = 0) -> dict | None:
        """The chunk's done marker, if it is one: a JSON object with its finish time."""
        data = CloudFiles(self.job_url).get(f"{self._done_prefix(stage, mip)}{ChunkPlan.chunk_id(chunk)}.json")
        return _valid_marker(data)

    def is_done(self, stage: int, chunk: Box, mip: int = 0) -> bool:
        return self.done_record(stage, chunk, mip) is not None

    def record_failure(self, stage: int, chunk: Box, failure: dict, mip: int = 0) -> None:
        """The last error of a chunk's task (a file per failing chunk, never read on the hot
        path): what the progress view shows beside a dead letter."""
        name = f"{self._stage_prefix('failed', stage, mip)}{ChunkPlan.chunk_id(chunk)}.json"
        CloudFiles(self.job_url).put_json(name, failure)

    def failure(self, stage: int, chunk: Box, mip: int = 0) -> dict | None:
        """The chunk's last recorded error (``record_failure``), if any."""
        name = f"{self._stage_prefix('failed', stage, mip)}{ChunkPlan.chunk_id(chunk)}.json"
        return _json_object(CloudFiles(self.job_url).get(name))

    def failed_chunks(self, stage: int) -> set[str]:
        """Chunk ids of the stage with a failure record: names only, one listing (O(failures))."""
        prefix = self._stage_prefix("failed", stage)
        return {name[len(prefix):].removesuffix(".json")
                for name in storage.list_folder(CloudFiles(self.job_url), prefix)}

    def done_mask(self, stage: int, mip: int = 0) -> np.ndarray:
        """One bool per index of the stage's plan: is that task done?  One listing, in bulk.

        Names that are not this plan's markers (a stray file, a writer's temporary) are
        ignored; markers are written whole (see :mod:`.storage`), so a listed one is complete.
        """
        plan = self.stage_plan(stage, mip)
        mask = np.zeros(len(plan), bool)
        prefix = self._done_prefix(stage, mip)
        for name in storage.list_folder(CloudFiles(self.job_url), prefix):
            box = self._plan_chunk(name[len(prefix):], ".json", plan)
            if box is not None:
                mask[plan.index_of(box)] = True
        return mask

    def done_records(self, stage: int, mip: int = 0) -> list[dict]:
        """Every valid done marker of the stage, read and checked (verification and reports)."""
        cf = CloudFiles(self.job_url)
        prefix = self._done_prefix(stage, mip)
        plan = self.stage_plan(stage, mip)
        names = [n for n in storage.list_folder(cf, prefix) if self._plan_chunk(n[len(prefix):], ".json", plan)]
        records = (_valid_marker(r["content"]) for r in cf.get(names))
        return [r for r in records if r is not None]


def _json_object(data: bytes | None) -> dict | None:
    """A stored JSON object, or None (absent, torn or not an object)."""
    try:
        record = json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _valid_marker(data: bytes | None) -> dict | None:
    record = _json_object(data)
    return record if record is not None and "finished_at" in record else None


def _check_existing_output(spec: JobSpec, roi: Box) -> Volume:
    out = open_volume(spec.output_url, 0)
    problems = []
    if out.num_channels != spec.model.out_channels:
        problems.append(f"{out.num_channels} channels, model.out_channels is {spec.model.out_channels}")
    if out.dtype != np.dtype(spec.output_dtype):
        problems.append(f"dtype {out.dtype}, output.dtype is {spec.output_dtype}")
    if not out.bounds.contains(roi):
        problems.append(f"bounds {out.bounds.to_dict()} do not contain roi {roi.to_dict()}")
    elif not roi.is_aligned(out.bounds.start, out.block_size, out.bounds):
        problems.append(
            f"roi {roi.to_dict()} is not aligned to its storage blocks {out.block_size.to_list()}"
        )
    if any(c % b for c, b in zip(spec.chunk_size, out.block_size)):
        problems.append(
            f"storage blocks {out.block_size.to_list()} do not divide chunk_size {spec.chunk_size.to_list()}"
        )
    if problems:
        raise VolumeError(f"existing output layer {spec.output_url} does not fit the job: " + "; ".join(problems))
    return out


def load_job_document(text: str) -> dict:
    """Parse a job spec file's text (JSON), with an error that says where it broke."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"job spec is not valid JSON: {e}") from None
