"""Ahead-of-time compilation for TPU topologies on a CPU host: per-chip memory, FLOPs, projections.

    pip install -e ".[tpu-aot]"      # jax[tpu]: a libtpu matching the installed jax
    python -m vdm.tools.aot --config configs/scale/dit_1b_480p.py --topology v5p:4x4x4 \
        [--topology v5e:16x16 ...] [--config.train.batch_size=64 ...] [--json report.json]

No TPU is needed: `jax.experimental.topologies.get_topology_desc` describes the devices of a TPU
slice, a `Mesh` over them takes the config's `mesh.shape`, and every input is a
`jax.ShapeDtypeStruct` with a `NamedSharding` (the train state comes from `jax.eval_shape`; no
parameter is ever materialised). `jax.jit(...).lower(...).compile()` then runs the real TPU
compiler, which fails if the program does not fit in a chip's HBM and otherwise reports
`memory_analysis()` and `cost_analysis()`.

Programs compiled (the same code training and sampling run, not copies):
  train_step   `vdm.train.loop.make_train_step(task, config, mesh)` of the config's stage, with the
               state shardings of `train_lib.state_shardings` and the task's frozen inputs.
  sample       `vdm.inference.pipeline.Pipeline.generate`: the sampler's `lax.scan` over
               `sample.num_steps` guided denoiser calls + the streaming VAE decode, with the
               denoiser params sharded like training and the batch over (data, fsdp).
  text_encode  the frozen text encoder (`TextEncoder.encode`) on a batch of prompts, its params
               sharded by the logical-axis rules (how prompts are encoded for sampling and for
               the latent/embedding cache).

The denoiser task is `DenoiserTask` (same loss, same batches) built with
`vdm.encoders.abstract(config)`: its frozen VAE and text-encoder params are abstract, so a
T5-XXL-size encoder is never downloaded or allocated. Its architecture comes from
`vdm.models.text.architectures` (known hub ids such as "google/t5-v1_1-xxl") or from the
`config.json` of a local model directory.

Figures per device (a TPU v5e/v5p/v6e chip is one JAX device; a v4 topology here gives one
device per TensorCore, two per chip, so HBM and peak FLOP/s are halved per device):
  arguments / outputs / alias / temporaries / code: bytes from `compiled.memory_analysis()`;
  total = arguments + outputs - alias (donated buffers counted once) + temporaries + code.
  HLO FLOPs: `compiled.cost_analysis()["flops"]` of the partitioned program (per device; includes
  remat recomputation and the frozen encoders). XLA counts a while-loop body once, so the
  sampler's FLOPs are `num_steps` x those of one guided denoiser call, compiled on its own (the
  VAE decode is not counted).
  With `model.scan_layers` the blocks are one while loop too, so a program's HLO FLOPs and
  cost-model time are extrapolated from two small UNROLLED compiles of the same program on the
  same mesh (depth 1 and 2): c(depth) = c(1) + (depth - 1) * (c(2) - c(1)) (the blocks are
  identical). Memory is always that of the real (scanned) program. Those two compiles turn off
  XLA's windowed einsums (`COUNTING_OPTIONS`): a collective matmul is a loop too, counted once.
  model FLOPs: the denoiser's analytic matmul FLOPs (`Denoiser.flops_per_example`): 3x forward
  for a train step, 2 (guidance) x forward per sampler step.
  PROJECTION (no TPU was run): step time = max(HLO FLOPs / peak bf16 FLOP/s, XLA's TPU cost-model
  estimate "optimal_seconds"); MFU = model FLOPs / (step time x peak). Both are bounds a real run
  does not beat (communication, attention kernels and input pipelines are not modelled).

libtpu looks for the TPU VM's metadata when it loads and warns loudly (TPU_ACCELERATOR_TYPE,
TPU_WORKER_HOSTNAMES) when there is none, as on any CPU host; `quiet_libtpu()` sets those
variables (and JAX_PLATFORMS=cpu, so the local backend is the CPU) before libtpu is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import vdm  # (imports jax, but initialises no backend: libtpu is not loaded yet)

# libtpu's TPU-VM placeholders (shared with vdm/__init__.py), and no single-owner lock.
_LIBTPU_ENV = {
    **vdm.TPU_PLACEHOLDER_ENV,
    # libtpu takes /tmp/libtpu_lockfile so that one process owns a real TPU; compiling for a
    # topology owns nothing, and parallel test workers / two AOT runs must not block each other.
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def quiet_libtpu() -> None:
    """Silences libtpu's "could not determine TPU accelerator type / worker hostnames" warnings.

    They only mean "this host is not a TPU VM", which is the point of AOT compilation. Must run
    before libtpu loads (the first `get_topology_desc`); also keeps the local JAX backend on the
    CPU when the backends are not initialised yet. Existing environment values win.
    """
    for key, value in _LIBTPU_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "jax" in sys.modules:
        import jax

        try:
            from jax._src import xla_bridge

            if not xla_bridge.backends_are_initialized():
                jax.config.update("jax_platforms", "cpu")
        except (ImportError, AttributeError):  # private API moved: the env var still applies.
            pass


quiet_libtpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from vdm import encoders as encoders_lib  # noqa: E402
from vdm import parallel, tasks  # noqa: E402
from vdm.errors import ConfigError, UserError  # noqa: E402
from vdm.models import denoiser as dn  # noqa: E402
from vdm.models.layers import count_params  # noqa: E402
from vdm.rng import base_key  # noqa: E402
from vdm.tasks.denoiser import DenoiserTask  # noqa: E402
from vdm.train import loop as train_lib  # noqa: E402

PyTree = Any
GiB = 1024**3


# ----------------------------------------------------------------------------- chips


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation (Google Cloud TPU documentation)."""

    hbm_gib: float  # HBM per chip.
    peak_bf16_tflops: float  # dense bf16 matmul peak per chip.
    source: str  # where the figures are documented.


CHIPS: dict[str, Chip] = {
    "v4": Chip(32, 275, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip(16, 197, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(95, 459, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(32, 918, "https://cloud.google.com/tpu/docs/v6e"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice described without hardware: its devices and per-device capacities."""

    name: str  # e.g. "v5p:4x4x4".
    generation: str  # a key of CHIPS.
    devices: tuple  # the topology's jax devices (compile targets only).
    chips: int  # product of the topology dims.

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def devices_per_chip(self) -> int:
        return max(1, len(self.devices) // self.chips)

    @property
    def hbm_per_device(self) -> float:
        """Bytes of HBM per JAX device (a chip's HBM split over its devices)."""
        return self.chip.hbm_gib * GiB / self.devices_per_chip

    @property
    def peak_per_device(self) -> float:
        """Peak bf16 FLOP/s per JAX device."""
        return self.chip.peak_bf16_tflops * 1e12 / self.devices_per_chip

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind


_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


def get_topology(name: str) -> Topology:
    """The devices of TPU slice `name` (e.g. "v5p:4x4x4", "v5e:2x2") from libtpu, no TPU needed.

    Raises:
      ConfigError: a malformed name, an unknown generation, or a shape libtpu rejects.
      UserError: libtpu is not installed.
    """
    m = _TOPOLOGY.match(name)
    if not m:
        raise ConfigError(
            f"--topology={name!r} is not GENERATION:SHAPE with GENERATION one of "
            f"{sorted(CHIPS)} and SHAPE the chip grid, e.g. v5e:2x2, v5e:16x16, v5p:4x4x4, "
            "v4:4x4x8, v6e:8x8."
        )
    require_libtpu()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu raises JaxRuntimeError with its own explanation.
        raise ConfigError(f"libtpu rejects --topology={name!r}: {str(e).splitlines()[0]}") from None
    chips = math.prod(int(s) for s in m.group(2).split("x"))
    return Topology(name, m.group(1), tuple(desc.devices), chips)


def require_libtpu() -> None:
    """Raises a UserError telling how to install libtpu when it is missing."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise UserError(
            "AOT compilation for TPU needs libtpu, which is not installed in this environment. "
            'Install the extra: pip install -e ".[tpu-aot]" (or pip install '
            f'"jax[tpu]=={jax.__version__}"); no TPU is needed, only the compiler library.'
        )


def make_topology_mesh(config, topology: Topology) -> Mesh:
    """`parallel.make_mesh(config.mesh)` over the topology's devices, with a clear error."""
    try:
        return parallel.make_mesh(config.mesh, topology.devices)
    except ConfigError as e:
        raise ConfigError(
            f"{e} (topology {topology.name} has {len(topology.devices)} devices; "
            f"set e.g. --config.mesh.shape=\"{{'data': -1, 'fsdp': 8, 'tensor': 1}}\".)"
        ) from None


# ----------------------------------------------------------------------------- abstract task


def abstract_task(config):
    """The config stage's Task with abstract frozen weights (`vdm.encoders.abstract`): the same
    `loss`, `dummy_batch` and `init` as training, nothing read or allocated."""
    if config.stage == "denoiser":
        return DenoiserTask(config, encoders_lib.abstract(config))
    return tasks.get_task(config)  # the autoencoder stage has no frozen weights.


# ----------------------------------------------------------------------------- reports


@dataclasses.dataclass
class ProgramReport:
    """What the compiler says about one program on one topology (bytes and FLOPs per device)."""

    name: str
    description: str
    arguments: int
    outputs: int
    alias: int
    temporaries: int
    code: int
    hlo_flops: float  # per device, per step (sampler: all steps).
    model_flops: float | None  # global, per step; None if not defined for this program.
    optimal_seconds: float | None  # XLA's TPU cost-model time estimate, per step.
    compile_seconds: float
    hbm_per_device: float
    peak_per_device: float
    num_devices: int
    failure: str = ""  # the compiler's out-of-memory message when it refused the program.

    @property
    def total(self) -> int:
        """Peak bytes per device: donated (aliased) buffers are counted once."""
        return self.arguments + self.outputs - self.alias + self.temporaries + self.code

    @property
    def fits(self) -> bool:
        return not self.failure and self.total <= self.hbm_per_device

    @property
    def seconds_at_peak(self) -> float:
        return self.hlo_flops / self.peak_per_device

    @property
    def projected_seconds(self) -> float:
        """PROJECTION: a lower bound of the step time (see the module docstring)."""
        return max(self.seconds_at_peak, self.optimal_seconds or 0.0)

    @property
    def projected_mfu(self) -> float | None:
        if not self.model_flops or not self.projected_seconds:
            return None
        per_device = self.model_flops / self.num_devices
        return per_device / (self.projected_seconds * self.peak_per_device)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            total=self.total,
            fits=self.fits,
            seconds_at_peak=self.seconds_at_peak,
            projected_seconds=self.projected_seconds,
            projected_mfu=self.projected_mfu,
        )
        return d


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return dict(
        arguments=int(m.argument_size_in_bytes),
        outputs=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        temporaries=int(m.temp_size_in_bytes),
        code=int(m.generated_code_size_in_bytes),
    )


def _cost(compiled) -> tuple[float, float | None]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per partition
        cost = cost[0] if cost else {}
    seconds = cost.get("optimal_seconds")
    return float(cost.get("flops", 0.0)), (float(seconds) if seconds and seconds > 0 else None)


_OOM = re.compile(
    r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm\. Exceeded hbm capacity by ([\d.]+[KMGT]?)"
)


class DoesNotFit(UserError):
    """A program needs more HBM per device than the chip has."""


def knob_advice(config, program: str, arguments: float, temporaries: float, mesh_shape=None) -> str:
    """Which config knob to turn first for a program that does not fit, and why.

    `mesh_shape`: the resolved mesh ({"data": 8, ...}); default the config's (data may be -1).

    The batch is split over data x fsdp only ("batch shards"); a tensor axis splits heads and MLP
    widths but holds a replica of its shard's videos. So trading fsdp (or data) for tensor at the
    same global batch doubles the videos per shard: the residual stream per device doubles and the
    head / MLP activations stay the same (measured: the 10B on v6e:8x8 went from 32.3 to 37.8 GiB
    per device). A tensor axis shrinks activations only with the batch per update kept by
    gradient accumulation (train.batch_size / 2, optim.accumulate_steps x 2).
    """
    shape = dict(mesh_shape or config.mesh.shape)
    data, fsdp = int(shape.get("data", 1)), int(shape.get("fsdp", 1))
    tensor = int(shape.get("tensor", 1))
    tips = []
    if arguments >= temporaries:
        tips.append(
            f"parameters / optimizer state / frozen weights dominate ({arguments / GiB:.1f} GiB of "
            f"arguments): raise mesh.fsdp (now {fsdp}) so they are split over more devices, e.g. "
            f"--config.mesh.shape=\"{{'data': -1, 'fsdp': {max(2, 2 * int(fsdp))}}}\""
        )
    remat = config.model.get("remat", "none") if "model" in config else "none"
    if temporaries > arguments or not tips:
        # A tensor axis of twice the size, taken from data if there is one, else from fsdp.
        new_fsdp = fsdp if data >= 2 else max(1, fsdp // 2)
        mesh = f"{{'data': -1, 'fsdp': {new_fsdp}, 'tensor': {2 * tensor}}}"
        act = f"activations dominate ({temporaries / GiB:.1f} GiB of temporaries)"
        if program == "train_step" and remat != "block":
            tips.append(
                f"{act}: recompute them in the backward pass with --config.model.remat=block "
                f"(now {remat!r})"
            )
        elif program == "train_step" and data > 0:
            batch = int(config.train.batch_size)
            accumulate = int(config.optim.get("accumulate_steps", 1)) if "optim" in config else 1
            per_shard = batch / (data * fsdp)
            if per_shard > 1:
                k = math.ceil(per_shard)
                tips.append(
                    f"{act} of {per_shard:g} videos per batch shard (train.batch_size={batch} "
                    f"over data x fsdp = {data * fsdp}): one per shard, with the batch per update "
                    f"kept by accumulation: --config.train.batch_size={data * fsdp} "
                    f"--config.optim.accumulate_steps={k * accumulate}"
                )
            else:
                tips.append(
                    f"{act} of {per_shard:g} video(s) per batch shard (data x fsdp); a bigger "
                    "tensor axis at this batch would put more videos on each shard (it holds a "
                    "replica of its shard's batch), so share each video between devices and keep "
                    f'the batch per update by accumulation: --config.mesh.shape="{mesh}" '
                    f"--config.train.batch_size={max(1, batch // 2)} "
                    f"--config.optim.accumulate_steps={2 * accumulate}"
                )
        else:
            tips.append(
                f"{act}: lower --sample_batch (the default is one video per data x fsdp shard), or "
                "shard them over a tensor axis (mesh.tensor splits heads and MLP widths; the "
                "default --sample_batch halves with data x fsdp), e.g. "
                f'--config.mesh.shape="{mesh}"'
            )
    return "; ".join(tips) + "."


def _oom_message(config, program: str, topology: Topology, error: Exception) -> str:
    text = str(error)
    m = _OOM.search(text)
    head = (
        f"{program} does not fit on {topology.name} ({topology.device_kind}, "
        f"{topology.hbm_per_device / GiB:.1f} GiB HBM per device)"
    )
    if m:
        head += f": the TPU compiler needs {m.group(1)}B of {m.group(2)}B, over by {m.group(3)}B"
    if program == "train_step":
        advice = (
            "Raise mesh.fsdp (splits params, optimizer state and frozen weights), set "
            "model.remat=block (recomputes activations) or lower train.batch_size."
        )
    else:
        advice = "Lower --sample_batch or raise mesh.fsdp."
    detail = "\n".join(ln for ln in text.splitlines()[:12] if ln.strip())
    return f"{head}. {advice}\nCompiler report:\n{detail}"


# ----------------------------------------------------------------------------- programs


def _sds(tree: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


# For the FLOP-counting compiles only (`unrolled_cost`). When a dot's operand is sharded, XLA's
# TPU SPMD partitioner may turn it into a "windowed einsum" (collective matmul): a while loop that
# overlaps a ring of collective-permutes with one slice of the dot per iteration. cost_analysis()
# counts a loop body once, so those dots lose all but 1/trip_count of their FLOPs (measured: the
# 10B train step at depth 1 on v6e:8x8 with fsdp=32 x tensor=2, 19.1 T HLO FLOPs per device with
# the loops, 24.2 T without = fwd + bwd + remat's recompute). Without windowed einsums the dots
# are plain (an all-gather / reduce-scatter, then the whole dot) and counted in full.
COUNTING_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def _windowed_einsums(compiled) -> int:
    """How many windowed-einsum loops (whose dots cost_analysis undercounts) a program has."""
    try:
        text = compiled.as_text()
    except Exception:  # not every backend / version gives the optimised HLO text.
        return 0
    return len(re.findall(r"body=%?[\w.]*windowed_dot_general_body", text))


def _compile(fn, args, what: str, config, topology: Topology, options: dict | None = None):
    start = time.perf_counter()
    try:
        lowered = fn.lower(*args)
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:  # the TPU compiler's out-of-memory is a JaxRuntimeError.
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            raise DoesNotFit(_oom_message(config, what, topology, e)) from None
        raise
    return compiled, time.perf_counter() - start


@dataclasses.dataclass
class Built:
    """Everything the program builders share for one (config, topology)."""

    config: Any
    topology: Topology
    mesh: Mesh
    task: Any
    abstract_state: Any
    state_shardings: Any
    frozen: PyTree  # the train step's frozen inputs (`task.frozen()`, unboxed)
    frozen_shardings: PyTree
    encoders: PyTree  # {"vae", "text"} for the sampler / text encoder ({} for the VAE stage)
    encoder_shardings: PyTree
    compiler_options: dict | None = None  # XLA options of its compiles (unrolled_cost's)


def build(config, topology: Topology, frozen_sharding: str = "rules") -> Built:
    """Abstract task, state and frozen inputs with their shardings on the topology's mesh.

    Args:
      config: the run config (stage, model, mesh, ...).
      topology: from `get_topology`.
      frozen_sharding: "rules" shards boxed frozen weights by the logical-axis rules; "replicated"
        puts a full copy on every device.

    Returns:
      A `Built`.
    """
    if config.parallel != "jit":
        raise ConfigError(
            f"config.parallel={config.parallel!r}: AOT compiles the jit path (a pmap run is the "
            "jit step with mesh data=N); use --config.parallel=jit."
        )
    mesh = make_topology_mesh(config, topology)
    task = abstract_task(config)
    tx, _ = train_lib.make_optimizer(config.optim, config.train.num_steps)
    abstract_state, shardings = train_lib.state_shardings(task, config, mesh, tx)
    rules = config.mesh.logical_axis_rules
    if frozen_sharding not in ("rules", "replicated"):
        raise ConfigError(f"frozen_sharding={frozen_sharding!r} is not 'rules' or 'replicated'.")

    def place(tree):
        if frozen_sharding == "rules":
            return parallel.logical_to_sharding(tree, mesh, rules)
        return jax.tree.map(lambda _: parallel.replicated(mesh), parallel.unbox(tree))

    frozen = task.frozen()
    encoders = task.encoders.boxed(config.data) if isinstance(task, DenoiserTask) else {}
    return Built(
        config, topology, mesh, task, abstract_state, shardings, parallel.unbox(frozen),
        place(frozen), parallel.unbox(encoders), place(encoders),
    )  # fmt: skip


def _report(name, description, compiled, seconds, b: Built, *, hlo_flops=None,
            model_flops=None, optimal=None) -> ProgramReport:  # fmt: skip
    flops, opt = _cost(compiled)
    return ProgramReport(
        name=name,
        description=description,
        **_memory(compiled),
        hlo_flops=flops if hlo_flops is None else hlo_flops,
        model_flops=model_flops,
        optimal_seconds=opt if optimal is None else optimal,
        compile_seconds=seconds,
        hbm_per_device=b.topology.hbm_per_device,
        peak_per_device=b.topology.peak_per_device,
        num_devices=len(b.topology.devices),
    )


def _undercount_note(compiled) -> str:
    """A description suffix when cost_analysis undercounts this program's FLOPs."""
    n = _windowed_einsums(compiled)
    if not n:
        return ""
    return (
        f"; HLO FLOPs UNDERCOUNTED: {n} windowed-einsum loop(s) counted once (set "
        "model.scan_layers for FLOPs from compiles without them)"
    )


def _scanned(config) -> bool:
    return config.stage == "denoiser" and bool(config.model.get("scan_layers", False))


def unrolled_cost(b: Built, compile_fn) -> tuple[float, float | None, float]:
    """(HLO FLOPs, cost-model seconds, compile seconds) of `b`'s program as if unrolled.

    For `model.scan_layers`, whose cost_analysis counts the scanned block once (see the module
    docstring): compiles `compile_fn(built) -> (compiled, seconds)` at depth 1 and 2 without
    scan and extrapolates linearly to `model.depth`. These compiles use COUNTING_OPTIONS (no
    windowed einsums, whose loops cost_analysis would also count once); so does the cost-model
    time taken from them.
    """
    costs, seconds = [], 0.0
    for depth in (1, 2):
        config = copy.deepcopy(b.config)
        config.model.depth = depth
        config.model.scan_layers = False
        built = dataclasses.replace(build(config, b.topology), compiler_options=COUNTING_OPTIONS)
        compiled, secs = compile_fn(built)
        costs.append(_cost(compiled))
        seconds += secs
    (f1, t1), (f2, t2) = costs
    extra = int(b.config.model.depth) - 1
    optimal = t1 + extra * (t2 - t1) if t1 is not None and t2 is not None else None
    return f1 + extra * (f2 - f1), optimal, seconds


def _train_step_program(b: Built):
    config, mesh, task = b.config, b.mesh, b.task
    batch_size = int(config.train.batch_size)
    parallel.check_batch_size(batch_size, mesh)
    step = train_lib.make_train_step(
        task, config, mesh, shardings=b.state_shardings, frozen_shardings=b.frozen_shardings
    )
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh))
        for k, v in task.dummy_batch(batch_size).items()
    }
    key = jax.eval_shape(lambda: base_key(config.seed))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(mesh))
    frozen = _sds(b.frozen, b.frozen_shardings)
    return _compile(step, (b.abstract_state, batch, key, frozen), "train_step", config,
                    b.topology, b.compiler_options)  # fmt: skip


def compile_train_step(b: Built):
    """Compiles `train_lib.make_train_step` for the topology; returns (compiled, ProgramReport)."""
    config, task = b.config, b.task
    batch_size = int(config.train.batch_size)
    compiled, seconds = _train_step_program(b)
    cost = {}
    if _scanned(config):
        flops, optimal, extra_seconds = unrolled_cost(b, _train_step_program)
        cost = dict(hlo_flops=flops, optimal=optimal)
        seconds += extra_seconds
    model_flops = None
    kind = "cached latents + embeddings" if getattr(task, "cached", False) else "raw videos"
    if isinstance(task, DenoiserTask):
        f = task.model.flops_per_example(task.latent_shape, task.text.max_length, task.text.dim)
        model_flops = 3.0 * batch_size * f
        if not task.cached:
            kind += " (VAE encode + text encode in the step)"
    desc = f"{config.stage} train step, batch {batch_size}, {kind}"
    if cost:
        desc += "; scanned blocks: FLOPs from unrolled depth 1 and 2 compiles"
    else:
        desc += _undercount_note(compiled)
    return compiled, _report(
        "train_step", desc, compiled, seconds, b, model_flops=model_flops, **cost
    )


def default_sample_batch(mesh: Mesh) -> int:
    """One video per batch shard (data x fsdp): the smallest batch every device works on."""
    return parallel.batch_divisor(mesh)


def _sample_inputs(b: Built, batch: int):
    task, mesh = b.task, b.mesh
    bs = parallel.batch_sharding(mesh)
    L, D = task.text.max_length, task.text.dim
    ctx_dtype = jnp.dtype(task.text.dtype)

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=bs)

    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    return dict(
        ctx=sds((batch, L, D), ctx_dtype),
        mask=sds((batch, L), jnp.int32),
        null_ctx=sds((batch, L, D), ctx_dtype),
        null_mask=sds((batch, L), jnp.int32),
        noise=sds((batch, *task.latent_shape), jnp.float32),
        keys=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=bs),
    )


def _guided_call_program(b: Built, batch: int):
    """One classifier-free-guided denoiser call (cond + uncond), compiled: (compiled, seconds)."""
    from vdm.diffusion import samplers

    task, mesh, rules = b.task, b.mesh, b.config.mesh.logical_axis_rules
    inputs = _sample_inputs(b, batch)
    rep, bs = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)

    def one_step(params, x, ctx, mask, null_ctx, null_mask, guidance):
        return samplers.guided_output(
            dn.model_fn(task.model, params),
            x,
            jnp.float32(0.5),
            (ctx, mask),
            (null_ctx, null_mask),
            guidance,
        )

    step_fn = jax.jit(
        parallel.with_sharding_rules(one_step, mesh, rules),
        in_shardings=(b.state_shardings.params, bs, bs, bs, bs, bs, rep),
        out_shardings=bs,
    )
    args = (b.abstract_state.params, inputs["noise"], inputs["ctx"], inputs["mask"],
            inputs["null_ctx"], inputs["null_mask"], scalar)  # fmt: skip
    return _compile(step_fn, args, "sample", b.config, b.topology, b.compiler_options)


def compile_sample(b: Built, batch: int):
    """Compiles the sampling program (`Pipeline.generate`) and one guided denoiser call.

    Returns:
      (compiled sampler, ProgramReport); FLOPs are `num_steps` x the guided call's.
    """
    from vdm.inference import pipeline

    config, task, mesh = b.config, b.task, b.mesh
    if not isinstance(task, DenoiserTask):
        raise ConfigError("The sample program exists for stage 'denoiser' only.")
    if batch % parallel.batch_divisor(mesh):
        raise ConfigError(
            f"--sample_batch={batch} does not divide over data x fsdp = "
            f"{parallel.batch_divisor(mesh)}; use a multiple of it."
        )
    rules = config.mesh.logical_axis_rules
    pipe = pipeline.Pipeline(
        config=config,
        text=task.text,
        vae=task.vae,
        vae_params=None,
        latent_stats=task.latent_stats,
        model=task.model,
        params=None,
    )
    s = config.sample
    sampler, num_steps = s.sampler, int(s.num_steps)
    inputs = _sample_inputs(b, batch)
    rep = parallel.replicated(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    params = b.abstract_state.params
    param_sh = b.state_shardings.params
    vae_sh = b.encoder_shardings["vae"]
    vae = _sds(b.encoders["vae"], vae_sh)
    bs = parallel.batch_sharding(mesh)
    fn = parallel.with_sharding_rules(
        functools.partial(pipe.generate, sampler=sampler, num_steps=num_steps), mesh, rules
    )
    in_sh = (param_sh, vae_sh, bs, bs, bs, bs, bs, rep, rep, bs)
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=bs)
    args = (params, vae, inputs["ctx"], inputs["mask"], inputs["null_ctx"], inputs["null_mask"],
            inputs["noise"], scalar, scalar, inputs["keys"])  # fmt: skip
    compiled, seconds = _compile(jitted, args, "sample", config, b.topology)

    # One guided denoiser call as its own program: XLA counts the scan body once, so the
    # sampler's FLOPs are num_steps x this program's.
    guided_call = functools.partial(_guided_call_program, batch=batch)
    note = ""
    if _scanned(config):
        step_flops, step_opt, step_seconds = unrolled_cost(b, guided_call)
    else:
        step_compiled, step_seconds = guided_call(b)
        step_flops, step_opt = _cost(step_compiled)
        note = _undercount_note(step_compiled)
    f = task.model.flops_per_example(task.latent_shape, task.text.max_length, task.text.dim)
    guided = 2 if float(s.guidance) != 1.0 else 1
    desc = (
        f"{sampler} x {num_steps} steps (guidance {s.guidance}, batch {batch} x {guided}) + VAE "
        f"decode of {config.data.num_frames}x{config.data.height}x{config.data.width}; FLOPs = "
        f"{num_steps} x one guided call (decode not counted){note}"
    )
    report = _report(
        "sample", desc, compiled, seconds + step_seconds, b,
        hlo_flops=num_steps * step_flops,
        model_flops=num_steps * 2.0 * batch * f,
        optimal=(num_steps * step_opt) if step_opt else None,
    )  # fmt: skip
    return compiled, report


def compile_text_encode(b: Built, batch: int):
    """Compiles the frozen text encoder on `batch` prompts; returns (compiled, ProgramReport)."""
    config, task, mesh = b.config, b.task, b.mesh
    if not isinstance(task, DenoiserTask):
        raise ConfigError("The text_encode program exists for stage 'denoiser' only.")
    bs = parallel.batch_sharding(mesh)
    L = task.text.max_length
    ids = jax.ShapeDtypeStruct((batch, L), jnp.int32, sharding=bs)
    sh = b.encoder_shardings["text"]
    params = _sds(b.encoders["text"], sh)
    fn = parallel.with_sharding_rules(task.text.encode, mesh, config.mesh.logical_axis_rules)
    jitted = jax.jit(fn, in_shardings=(sh, bs, bs), out_shardings=bs)
    compiled, seconds = _compile(jitted, (params, ids, ids), "text_encode", config, b.topology)
    desc = f"{task.text.name} ({task.text.module.__class__.__name__}) on {batch} x {L} tokens"
    desc += _undercount_note(compiled)
    return compiled, _report("text_encode", desc, compiled, seconds, b)


PROGRAMS = ("train_step", "sample", "text_encode")


@dataclasses.dataclass
class TopologyReport:
    """All programs of one config on one topology."""

    topology: Topology
    mesh: dict[str, int]
    params: dict[str, int]
    programs: list[ProgramReport]
    frozen_sharding: str
    build_seconds: float
    compiled: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        t = self.topology
        return dict(
            topology=t.name,
            device_kind=t.device_kind,
            devices=len(t.devices),
            chips=t.chips,
            devices_per_chip=t.devices_per_chip,
            hbm_per_device=t.hbm_per_device,
            peak_bf16_flops_per_device=t.peak_per_device,
            chip_source=t.chip.source,
            mesh=self.mesh,
            params=self.params,
            frozen_sharding=self.frozen_sharding,
            build_seconds=self.build_seconds,
            programs=[p.to_json() for p in self.programs],
        )


def run(
    config,
    topology: str | Topology,
    programs: Sequence[str] = PROGRAMS,
    *,
    sample_batch: int | None = None,
    frozen_sharding: str = "rules",
    progress=None,
) -> TopologyReport:
    """AOT-compiles `programs` of `config` for `topology`; never runs them.

    Args:
      config: a validated config (`vdm.config.load_config`).
      topology: e.g. "v5p:4x4x4", or a `Topology`.
      programs: names from PROGRAMS; sample / text_encode are skipped for the autoencoder stage.
      sample_batch: videos per sampler / text-encoder call (default: data x fsdp).
      frozen_sharding: "rules" or "replicated" (see `build`).
      progress: optional `progress(message)` called as each program is compiled.

    Returns:
      The TopologyReport (its `.compiled` maps program names to the compiled executables).

    Raises:
      DoesNotFit: a program needs more HBM per device than the chip has (after all programs ran,
        so every table is printed first by `main`).
    """
    bad = [p for p in programs if p not in PROGRAMS]
    if bad:
        raise ConfigError(f"Unknown program(s) {bad}; choose from {list(PROGRAMS)}.")
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    start = time.perf_counter()
    b = build(config, topo, frozen_sharding)
    build_seconds = time.perf_counter() - start
    params = {"trainable": count_params(b.abstract_state.params)}
    if isinstance(b.task, DenoiserTask):
        params["text_encoder"] = count_params(b.encoders["text"])
        params["vae"] = count_params(b.encoders["vae"])
    batch = sample_batch or default_sample_batch(b.mesh)
    report = TopologyReport(topo, dict(b.mesh.shape), params, [], frozen_sharding, build_seconds)
    for name in programs:
        if name != "train_step" and not isinstance(b.task, DenoiserTask):
            continue
        try:
            if name == "train_step":
                compiled, prog = compile_train_step(b)
            elif name == "sample":
                compiled, prog = compile_sample(b, batch)
            else:
                compiled, prog = compile_text_encode(b, batch)
        except DoesNotFit as e:
            report.programs.append(_failed(name, str(e), topo))
            if progress:
                progress(f"  {name}: does not fit")
            continue
        report.compiled[name] = compiled
        report.programs.append(prog)
        if progress:
            progress(f"  {name}: compiled in {prog.compile_seconds:.1f} s")
    return report


def _failed(name: str, message: str, topo: Topology) -> ProgramReport:
    m = _OOM.search(message)
    total = _parse_bytes(m.group(1)) if m else 0
    p = ProgramReport(name, "DOES NOT FIT: " + message.splitlines()[0], 0, 0, 0, total, 0, 0.0,
                      None, None, 0.0, topo.hbm_per_device, topo.peak_per_device,
                      len(topo.devices))  # fmt: skip
    p.failure = message
    return p


def _parse_bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(float(text))


def check_fit(report: TopologyReport, config) -> None:
    """Raises DoesNotFit naming each program over its HBM, by how much, and the knob to turn."""
    problems = []
    t = report.topology
    for p in report.programs:
        if p.fits:
            continue
        if p.failure:
            problems.append(p.failure)
            continue
        over = p.total - p.hbm_per_device
        problems.append(
            f"{p.name} does not fit on {t.name}: {p.total / GiB:.2f} GiB per device of "
            f"{p.hbm_per_device / GiB:.1f} GiB HBM (over by {over / GiB:.2f} GiB). "
            + knob_advice(config, p.name, p.arguments, p.temporaries, report.mesh)
        )
    if problems:
        raise DoesNotFit("\n".join(problems))


# ----------------------------------------------------------------------------- printing


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.1f} us"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def format_report(report: TopologyReport, title: str = "") -> str:
    """Markdown tables (also readable in a terminal) of one TopologyReport."""
    t = report.topology
    mesh = " x ".join(f"{a}={s}" for a, s in report.mesh.items())
    params = ", ".join(f"{k} {_si(v)}" for k, v in report.params.items())
    lines = [
        f"### {title + ' on ' if title else ''}{t.name} ({len(t.devices)} x {t.device_kind}, "
        f"mesh {mesh})",
        "",
        f"Per device: {_gib(t.hbm_per_device)} GiB HBM, peak {_si(t.peak_per_device, 'FLOP/s')} "
        f"bf16 ({t.devices_per_chip} device(s) per chip; {t.chip.source}). Params: {params}. "
        f"Frozen weights: {report.frozen_sharding}.",
        "",
        "| program | arguments GiB | outputs GiB | aliased GiB | temporaries GiB | code GiB | "
        "total GiB | HBM GiB | fits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in report.programs:
        if p.fits:
            fits = "yes"
        elif p.total > p.hbm_per_device:
            fits = f"**NO** (+{_gib(p.total - p.hbm_per_device)})"
        else:
            fits = "**NO** (compiler)"
        lines.append(
            f"| {p.name} | {_gib(p.arguments)} | {_gib(p.outputs)} | {_gib(p.alias)} | "
            f"{_gib(p.temporaries)} | {_gib(p.code)} | {_gib(p.total)} | "
            f"{_gib(p.hbm_per_device)} | {fits} |"
        )
    lines += [
        "",
        "| program | HLO FLOPs / device | model FLOPs (global) | time at peak | XLA cost model | "
        "**projected** step time | **projected** MFU | compile |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in report.programs:
        mfu = p.projected_mfu
        lines.append(
            f"| {p.name} | {_si(p.hlo_flops)} | {_si(p.model_flops)} | "
            f"{_seconds(p.seconds_at_peak)} | {_seconds(p.optimal_seconds)} | "
            f"{_seconds(p.projected_seconds)} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
            f"{p.compile_seconds:.1f} s |"
        )
    lines.append("")
    for p in report.programs:
        lines.append(f"- {p.name}: {p.description}")
    lines += [
        "",
        "Projection, not a measurement: step time = max(HLO FLOPs / peak, XLA cost model); "
        "MFU = model FLOPs / devices / (step time x peak).",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from vdm import cli
    from vdm import config as config_lib

    cli.quiet_library_logs()
    F = flags.FLAGS
    with cli.clear_errors():
        config = F.config
        config_lib.validate(config)
        programs = [p for s in F.programs for p in s.split(",") if p]
        reports, failures = [], []
        for name in F.topology:
            print(f"Compiling {', '.join(programs)} for {name} ...", flush=True)
            report = run(
                config,
                name,
                programs,
                sample_batch=F.sample_batch,
                frozen_sharding=F.frozen_sharding,
                progress=lambda m: print(m, flush=True),
            )
            print(format_report(report, os.path.basename(F["config"].config_filename or "")))
            reports.append(report)
            try:
                check_fit(report, config)
            except DoesNotFit as e:
                failures.append(str(e))
        if F.json:
            payload = dict(
                config=F["config"].config_filename,
                overrides=[a for a in sys.argv[1:] if a.startswith("--config.")],
                jax_version=jax.__version__,
                reports=[r.to_json() for r in reports],
            )
            with open(F.json, "w") as f:
                json.dump(payload, f, indent=1)
            print(f"Wrote {F.json}")
        if failures:
            raise DoesNotFit("\n".join(failures))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_multi_string("topology", None, "TPU topology, e.g. v5p:4x4x4 (repeatable).")
    flags.DEFINE_multi_string(
        "programs", [",".join(PROGRAMS)], f"Programs to compile, from {list(PROGRAMS)}."
    )
    flags.DEFINE_integer("sample_batch", None, "Videos per sampler call (default: data x fsdp).")
    flags.DEFINE_enum(
        "frozen_sharding", "rules", ["rules", "replicated"],
        "Frozen VAE / text-encoder weights: sharded by the logical-axis rules or replicated.",
    )  # fmt: skip
    flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    from absl import app

    from vdm import cli

    _define_flags()
    app.run(main, flags_parser=cli.parse_flags_with_help)
