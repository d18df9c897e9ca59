"""Ahead-of-time compilation for TPU topologies on a CPU host: per-chip memory, FLOPs, projections.

    pip install -e ".[tpu-aot]"      # jax[tpu]: a libtpu matching the installed jax
    python -m vdm.tools.aot --config configs/scale/dit_1b_480p.py --topology v5p:4x4x4 \
        [--topology v5e:16x16 ...] [--config.train.batch_size=64 ...] [--json report.json]

No TPU is needed: `jax.experimental.topologies.get_topology_desc` describes the devices of a TPU
slice, a `Mesh` over them takes the config's `mesh.shape`, and every input is a
`jax.ShapeDtypeStruct` with a `NamedSharding`. `jax.jit(...).lower(...).compile()` then runs the
real TPU compiler, which fails if the program does not fit in a chip's HBM and otherwise reports
`memory_analysis()` and `cost_analysis()`.

Modules, lower first:
  chips      the chip catalogue, a topology's devices from libtpu, its mesh; libtpu's environment
             (set when this package is imported, before libtpu loads).
  advice     DoesNotFit, the compiler's out-of-memory message, which config knob to turn.
  report     ProgramReport / TopologyReport: the figures, JSON, the fit check.
  table      a TopologyReport as Markdown tables.
  abstract   one config on one topology: the real Task with abstract frozen weights, the train
             setup and the encoders, every leaf a sharded ShapeDtypeStruct.
  programs   compiling train_step, sample and text_encode into ProgramReports.
  runner     `run(config, topology, programs)`: all programs of one topology.
  __main__   the command line.
  wan, wan_train, wan_cli
             Wan 2.1 (vdm.models.wan): its sampler and a stand-in full / LoRA fine-tuning step,
             `python -m vdm.tools.aot.wan_cli --wan 1.3b|14b --topology ...` (docs/aot.md).
"""

from vdm.tools.aot import chips  # noqa: I001  (first: libtpu's environment before it loads)
from vdm.tools.aot.abstract import Built, abstract_task, build
from vdm.tools.aot.advice import DoesNotFit, knob_advice
from vdm.tools.aot.chips import CHIPS, GiB, Chip, Topology, get_topology, make_topology_mesh
from vdm.tools.aot.programs import (
    PROGRAMS,
    compile_sample,
    compile_text_encode,
    compile_train_step,
    default_sample_batch,
)
from vdm.tools.aot.report import ProgramReport, TopologyReport, check_fit
from vdm.tools.aot.runner import run
from vdm.tools.aot.table import format_report

__all__ = [
    "CHIPS",
    "PROGRAMS",
    "Built",
    "Chip",
    "DoesNotFit",
    "GiB",
    "ProgramReport",
    "Topology",
    "TopologyReport",
    "abstract_task",
    "build",
    "check_fit",
    "chips",
    "compile_sample",
    "compile_text_encode",
    "compile_train_step",
    "default_sample_batch",
    "format_report",
    "get_topology",
    "knob_advice",
    "make_topology_mesh",
    "run",
]
