"""TPU chips and slices without hardware: the chip catalogue, a topology's devices from libtpu,
a mesh over them, and libtpu's environment on a CPU host.

libtpu looks for the TPU VM's metadata when it loads and warns loudly (TPU_ACCELERATOR_TYPE,
TPU_WORKER_HOSTNAMES) when there is none, as on any CPU host; `quiet_libtpu()` sets those
variables (and JAX_PLATFORMS=cpu, so the local backend is the CPU) before libtpu is loaded. It
runs when this module is imported, which `vdm.tools.aot` does before anything else.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys

import jax
from jax.sharding import Mesh

import vdm
from vdm import parallel
from vdm.errors import ConfigError, UserError

GiB = 1024**3

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
        try:
            from jax._src import xla_bridge

            if not xla_bridge.backends_are_initialized():
                jax.config.update("jax_platforms", "cpu")
        except (ImportError, AttributeError):  # private API moved: the env var still applies.
            pass


quiet_libtpu()


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
    """A TPU slice described without hardware: its devices and per-device capacities.

    A TPU v5e/v5p/v6e chip is one JAX device; a v4 topology gives one device per TensorCore, two
    per chip, so HBM and peak FLOP/s are halved per device.
    """

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
