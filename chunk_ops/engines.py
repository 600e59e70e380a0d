"""Inference engines: run a network on a batch of patches.

Every engine takes float32 ``(batch, channel, z, y, x)`` arrays and returns
float32 arrays of the same layout.  :class:`Predictor` adds what the job spec
promises on top of any engine: checked channel counts and patch sizes, centre
cropping to the output patch, and counts of the patches it evaluated (the
numerator of compute amplification).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from .geometry import Vec3


class ModelError(ValueError):
    """A model cannot be loaded or does not match the job spec."""


class Engine(Protocol):
    """Runs a batch; engines that compute asynchronously (CUDA) also offer ``submit``,
    which starts a batch and returns a function that waits for its output."""

    name: str
    threads: int  # the CPU threads it computes on, as its runtime reports them

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16).

    Without it PyTorch emulates bf16 convolutions: here 145x slower than float32.
    Unknown platforms (no /proc/cpuinfo) count as capable.
    """
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return True
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


# --- thread budgets ---------------------------------------------------------------------------------
# Workers sharing a machine each get a share of its cores: N processes that each take every
# core thrash.  Whoever starts workers knows how many share the machine (the local pool, the
# DAG's local workers; a pod its CPU request) and sets CHUNK_OPS_THREADS (or `worker --threads`);
# every engine is built with worker_threads().

THREADS_ENV = "CHUNK_OPS_THREADS"


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset, taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_for(cpus: float) -> int:
    """A worker's thread budget from its share of cores (cores / workers, or a pod's CPU
    request): the whole cores in it, at least one."""
    if not cpus > 0:
        raise ValueError(f"a worker's share of cores must be positive, got {cpus!r}")
    return max(1, int(cpus))


def local_share(workers: int) -> int:
    """The thread budget of each of ``workers`` workers sharing this machine."""
    return threads_for(machine_cores() / workers)


def worker_threads() -> int:
    """This worker's thread budget: ``CHUNK_OPS_THREADS``, else every core here (a lone worker)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return machine_cores()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r} is not a positive whole number of threads")
    return int(value)


class _PinnedSlot:
    """Page-locked host buffers for one batch in flight, and the event that frees them."""

    def __init__(self, torch):
        self._torch = torch
        self._buffers: dict[tuple, object] = {}
        self.done = torch.cuda.Event()
        self.done.record()

    def buffer(self, name: str, shape) -> "object":
        key = (name, tuple(shape))
        if key not in self._buffers:
            self._buffers[key] = self._torch.empty(key[1], dtype=self._torch.float32, pin_memory=True)
        return self._buffers[key]


def _inputs_to_float32(module, args: tuple) -> tuple:
    """A forward pre-hook: the module computes in float32 (autocast leaves float32 ops alone)."""
    return tuple(a.float() for a in args)


class TorchEngine:
    """PyTorch on CPU or CUDA; fp16/bf16 through autocast, outputs back in float32.

    On CUDA, batches go through page-locked (pinned) host buffers with
    asynchronous copies, two batches in flight: while the GPU computes one, the
    caller prepares the next and blends the previous (see ``submit``).
    ``threads``: the worker's CPU thread budget (``torch.set_num_threads``: process-wide).
    """

    def __init__(self, module, *, threads: int, device: str = "auto", precision: str = "float32"):
        import torch

        torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelError("inference.device is 'cuda' but no CUDA device is available")
        self._torch = torch
        self.device = torch.device(device)
        self.module = module.to(self.device)
        try:
            self.module.eval()
        except NotImplementedError:  # a torch.export program's module(): its graph keeps the mode it was exported in
            pass
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
        if self.autocast_dtype is torch.float16 and self.device.type == "cpu":
            raise ModelError("inference.precision 'float16' needs a CUDA device; use 'bfloat16' on CPUs")
        if self.autocast_dtype is torch.bfloat16 and self.device.type == "cpu" and not cpu_has_bf16():
            raise ModelError("inference.precision 'bfloat16' with engine 'pytorch' on this CPU (no bf16 units) is "
                             "emulated, about 100x slower than float32; use engine 'openvino' or 'auto' (it "
                             "runs float32 here) or precision 'float32'")
        if self.autocast_dtype is not None:
            # autocast leaves sigmoid/softmax outputs in bf16/fp16, whose steps near 1 (0.004 in bf16)
            # swallow the watershed's seed threshold 0.9999 and merge cells (docs/precision.md)
            for m in self.module.modules():
                if isinstance(m, (torch.nn.Sigmoid, torch.nn.Softmax)):
                    m.register_forward_pre_hook(_inputs_to_float32)
        self.name = f"torch-{self.device.type}-{precision}"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one patch shape: let cuDNN pick its fastest kernels
            self._slots = [_PinnedSlot(torch), _PinnedSlot(torch)]
            self._next_slot = 0

    def _forward(self, x):
        if self.autocast_dtype is None:
            return self.module(x)
        with self._torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.module(x)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.device.type == "cuda":
            return self.submit(batch)()
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            return self._forward(x).float().numpy()

    def submit(self, batch: np.ndarray):
        """Start ``batch``; return a function that waits for and returns its output."""
        if self.device.type != "cuda":
            out = self(batch)
            return lambda: out
        torch = self._torch
        slot = self._slots[self._next_slot]
        self._next_slot ^= 1
        slot.done.synchronize()  # the batch that used these buffers before has been collected
        with torch.inference_mode():
            host_in = slot.buffer("in", batch.shape)
            host_in.numpy()[...] = batch
            y = self._forward(host_in.to(self.device, non_blocking=True)).float()
            host_out = slot.buffer("out", y.shape)
            host_out.copy_(y, non_blocking=True)
            slot.done.record()

        def result() -> np.ndarray:
            slot.done.synchronize()
            return host_out.numpy().copy()

        return result


def fixed_input_shape_error(shape: list, batch_size: int, in_channels: int, patch: Vec3) -> str | None:
    """Why an ONNX model's fixed input dimensions do not fit the spec (None if they fit).

    ``shape`` is the model's (batch, channel, z, y, x) input, None where dynamic.
    """
    if len(shape) != 5:
        return f"the model's input has {len(shape)} dimensions {shape}; (batch, channel, z, y, x) needs 5"
    b, c, *zyx = shape
    if b is not None and b != batch_size:
        return f"the model's batch size is fixed at {b}, but inference.batch_size is {batch_size}"
    if c is not None and c != in_channels:
        return f"the model's input has {c} channels, but model.in_channels is {in_channels}"
    if any(m is not None and m != w for m, w in zip(zyx, patch.zyx())):
        have = [m if m is not None else "any" for m in reversed(zyx)]
        return (f"the model's input patch is fixed at (x,y,z) {have}, but model.input_patch is "
                f"{patch.to_list()}")
    return None


class OnnxRuntimeEngine:
    """ONNX Runtime on CPU, float32, on ``threads`` threads (``intra_op_num_threads``)."""

    def __init__(self, onnx: bytes, *, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        self.threads = self.session.get_session_options().intra_op_num_threads
        self.input_name = self.session.get_inputs()[0].name
        self.name = "onnxruntime-cpu-float32"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)


class OpenVinoEngine:
    """OpenVINO on CPU, compiled for the job's exact batch and patch (static shapes run fastest).

    Its batch is static (``fixed_batch`` pads a partial last one).  ``bfloat16`` is asked for with
    ``INFERENCE_PRECISION_HINT`` (OpenVINO's default differs between CPUs, so it is
    always set); a CPU without bf16 units runs float32, and the name says so.  It runs on
    ``threads`` threads (``INFERENCE_NUM_THREADS``; OpenVINO ignores torch's and OpenMP's settings).
    """

    def __init__(self, model, *, threads: int, precision: str = "float32"):
        import openvino as ov

        hint = {"float32": "f32", "bfloat16": "bf16"}.get(precision)
        if hint is None:
            raise ModelError(f"inference.precision {precision!r} is not available with engine openvino on CPUs; "
                             f"use 'float32' or 'bfloat16'")
        # LATENCY: one request uses every core; with our one synchronous caller it ran 2x THROUGHPUT here
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if threads < machine_cores():
            # workers sharing a machine: OpenVINO pins each one's threads from core 0 on, so two
            # 1-thread workers shared one core (337 against 168 ms a patch each, 2 cores)
            config["ENABLE_CPU_PINNING"] = False
        compiled = ov.Core().compile_model(model, "CPU", config)
        self.threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        self.request = compiled.create_infer_request()
        ran_type = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        ran = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(ran_type, ran_type)
        self.precision = ran
        self.name = f"openvino-cpu-{ran}"
        if ran != precision:
            self.name += f" ({precision} asked; this CPU has no {precision} support)"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.array(out, dtype=np.float32)


class FixedBatch:
    """An engine whose model takes exactly ``size`` patches a batch (a static batch dimension):
    a chunk's partial last batch is padded with zeros, and the padding's outputs dropped."""

    def __init__(self, engine, size: int):
        self.engine, self.size = engine, size

    def __getattr__(self, name):  # name, threads, precision...: the engine's
        return getattr(self.engine, name)

    def _padded(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == self.size:
            return batch
        padded = np.zeros((self.size, *batch.shape[1:]), np.float32)
        padded[:len(batch)] = batch
        return padded

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.engine(self._padded(batch))[:len(batch)]

    def submit(self, batch: np.ndarray):
        start = getattr(self.engine, "submit", None)
        if start is None:
            out = self(batch)
            return lambda: out
        result, n = start(self._padded(batch)), len(batch)
        return lambda: result()[:n]


def fixed_batch(engine, batch: int | None):
    return FixedBatch(engine, batch) if batch is not None and batch > 1 else engine


def _centre_crop_slices(have: tuple[int, ...], want: Vec3) -> tuple[slice, ...]:
    return tuple(slice((h - w) // 2, (h - w) // 2 + w) for h, w in zip(have, want.zyx()))


@dataclass
class Predictor:
    """An engine bound to the job's patch sizes and channel counts."""

    engine: Engine
    input_patch: Vec3
    output_patch: Vec3
    in_channels: int
    out_channels: int
    batch_size: int = 1
    patches_evaluated: int = field(default=0, init=False)
    # held by a chunk's whole patch loop: task threads sharing the model take turns
    lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def check(self) -> None:
        """One forward pass on a batch of zeros: channels and output size must match the spec."""
        probe = np.zeros((self.batch_size, self.in_channels, *self.input_patch.zyx()), np.float32)
        try:
            out = self.engine(probe)
        except Exception as e:  # the engine's own message says what it disliked
            raise ModelError(
                f"the model failed on a ({self.batch_size}, {self.in_channels}, {', '.join(map(str, self.input_patch.zyx()))}) "
                f"input, i.e. model.in_channels={self.in_channels}, model.input_patch (x,y,z)="
                f"{self.input_patch.to_list()}: {type(e).__name__}: {e}"
            ) from e
        if out.ndim != 5 or out.shape[1] != self.out_channels:
            raise ModelError(
                f"the model returns {out.shape[1] if out.ndim == 5 else '?'} channels "
                f"(output shape {tuple(out.shape)}), but model.out_channels is {self.out_channels}"
            )
        spatial = out.shape[2:]
        if any(h < w or (h - w) % 2 for h, w in zip(spatial, self.output_patch.zyx())):
            raise ModelError(
                f"the model's output patch (z,y,x) {tuple(spatial)} cannot be centre-cropped to "
                f"model.output_patch (x,y,z) {self.output_patch.to_list()}"
            )
        self.patches_evaluated = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.submit(batch)()

    def submit(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """Start ``batch`` on the engine; the returned function gives its cropped output.

        Engines without ``submit`` compute right away; on CUDA the batch runs
        while the caller goes on (prepares the next batch, blends the previous).
        """
        start = getattr(self.engine, "submit", None)
        if start is None:
            out = self.engine(batch)
            result = lambda: out  # noqa: E731
        else:
            result = start(batch)
        self.patches_evaluated += len(batch)

        def cropped() -> np.ndarray:
            out = result()
            if out.shape[2:] != self.output_patch.zyx():
                out = out[(slice(None), slice(None), *_centre_crop_slices(out.shape[2:], self.output_patch))]
            return out

        return cropped
