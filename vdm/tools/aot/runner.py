"""Compile a config's programs for one topology into a TopologyReport."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from vdm.errors import ConfigError
from vdm.models import attention
from vdm.models.layers import count_params
from vdm.tasks.denoiser import DenoiserTask
from vdm.tools.aot.abstract import Built, build
from vdm.tools.aot.advice import DoesNotFit
from vdm.tools.aot.chips import Topology, get_topology
from vdm.tools.aot.programs import COMPILERS, PROGRAMS, default_sample_batch
from vdm.tools.aot.report import TopologyReport, failed_report


def _params(b: Built) -> dict[str, int]:
    """Parameter counts: the trained ones, and the frozen encoders' of a denoiser."""
    params = {"trainable": count_params(b.train.abstract_state.params)}
    if isinstance(b.task, DenoiserTask):
        params["text_encoder"] = count_params(b.encoders["text"])
        params["vae"] = count_params(b.encoders["vae"])
    return params


def run(
    config,
    topology: str | Topology,
    programs: Sequence[str] = PROGRAMS,
    *,
    sample_batch: int | None = None,
    frozen_sharding: str = "rules",
    progress=None,
    count_flops: bool = True,
) -> TopologyReport:
    """AOT-compiles `programs` of `config` for `topology`; never runs them.

    Args:
      config: a validated config (`vdm.config.load_config`).
      topology: e.g. "v5p:4x4x4", or a `Topology`.
      programs: names from PROGRAMS; sample / text_encode are skipped for the autoencoder stage.
      sample_batch: videos per sampler / text-encoder call (default: data x fsdp).
      frozen_sharding: "rules" or "replicated" (see `abstract.build`).
      progress: optional `progress(message)` called as each program is compiled.
      count_flops: False skips the FLOP-counting compiles of a scanned train step (memory only).

    Returns:
      The TopologyReport (its `.compiled` maps program names to the compiled executables).
      A program that does not fit is reported as such (`ProgramReport.failure`), not raised:
      `report.check_fit` raises DoesNotFit for all of them once every table is printed.
    """
    bad = [p for p in programs if p not in PROGRAMS]
    if bad:
        raise ConfigError(f"Unknown program(s) {bad}; choose from {list(PROGRAMS)}.")
    # Traced for TPU devices on this CPU host: "auto" attention picks the TPU kernel (splash).
    with attention.target_platform("tpu"):
        topo = topology if isinstance(topology, Topology) else get_topology(topology)
        start = time.perf_counter()
        b = dataclasses.replace(build(config, topo, frozen_sharding), count_flops=count_flops)
        build_seconds = time.perf_counter() - start
        batch = sample_batch or default_sample_batch(b.mesh)
        report = TopologyReport(topo, dict(b.mesh.shape), _params(b), [], frozen_sharding,
                                build_seconds)  # fmt: skip
        say = progress or (lambda message: None)
        for name in programs:
            if name != "train_step" and not isinstance(b.task, DenoiserTask):
                continue
            try:
                compiled, prog = COMPILERS[name](b, batch)
            except DoesNotFit as e:
                report.programs.append(failed_report(name, str(e), topo))
                say(f"  {name}: does not fit")
                continue
            report.compiled[name] = compiled
            report.programs.append(prog)
            say(f"  {name}: compiled in {prog.compile_seconds:.1f} s")
    return report
