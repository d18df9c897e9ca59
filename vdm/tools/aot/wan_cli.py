"""`python -m vdm.tools.aot.wan_cli`: compile Wan 2.1's sampler and fine-tuning steps for TPU
topologies (`vdm.tools.aot.wan`, `vdm.tools.aot.wan_train`), print the tables, optionally write
JSON (rewritten after each program compiles, so a stopped run keeps what finished); exits with
DoesNotFit's message when a program is over its HBM.

    python -m vdm.tools.aot.wan_cli --wan 1.3b --topology v5p:2x2x3 \\
        --config.mesh.shape="{'data': 1, 'fsdp': 4, 'sequence': 3, 'tensor': 1}" \\
        --programs train,lora,step,decode --json report.json

The config (default configs/wan_finetune.py, the stage the train / lora programs compile) gives
the mesh, its rules, the optimizer and the batch. Programs: `sample` (WanPipeline.generate
whole), `step` (one guided transformer call: the sampler's loop body) and `decode` (the VAE
decode) -- the sampler is `sample.num_steps` x step + decode --, `train` and `lora`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from vdm import cli, parallel
from vdm.errors import ConfigError
from vdm.models import attention
from vdm.tools.aot import wan, wan_train
from vdm.tools.aot.advice import DoesNotFit
from vdm.tools.aot.chips import GiB, get_topology
from vdm.tools.aot.report import TopologyReport, failed_report
from vdm.tools.aot.table import format_report

PROGRAMS = ("sample", "step", "decode", "train", "lora")
DEFAULT_PROGRAMS = "train,lora,step,decode"  # `sample` whole is the slow compile (docs/aot.md)
_BASE = wan_train.WAN_FINETUNE


def _compile(b: wan.WanBuilt, name: str, sample_batch: int | None, full_depth: bool):
    batch = sample_batch or parallel.batch_divisor(b.mesh)
    if name == "sample":
        return wan.compile_sample(b, batch, full_depth)
    if name == "step":
        return wan.compile_step(b, batch, full_depth)
    if name == "decode":
        return wan.compile_decode(b, batch)
    return wan_train.compile_train(b, name, full_depth)


def run(name: str, config, topology: str, programs: Sequence[str], *, sample_batch=None,
        full_depth: bool = False, progress=None, on_program=None) -> TopologyReport:  # fmt: skip
    """AOT-compiles `programs` of the Wan preset `name` for `topology`; never runs them. A
    program the compiler refuses is reported as such (`ProgramReport.failure`), not raised.
    `on_program(report)` is called with the report so far after each program."""
    bad = [p for p in programs if p not in PROGRAMS]
    if bad:
        raise ConfigError(f"Unknown program(s) {bad}; choose from {list(PROGRAMS)}.")
    say = progress or (lambda message: None)
    done = on_program or (lambda report: None)
    with attention.target_platform("tpu"):
        topo = get_topology(topology)
        start = time.perf_counter()
        b = wan.build(name, config, topo)
        params = {"transformer": wan.num_params(b)}
        report = TopologyReport(topo, dict(b.mesh.shape), params, [], "-",
                                time.perf_counter() - start)  # fmt: skip
        for program in programs:
            cpu = time.process_time()
            try:
                prog = _compile(b, program, sample_batch, full_depth)
                cpu = time.process_time() - cpu
            except DoesNotFit as e:
                report.programs.append(failed_report(program, str(e), topo))
                say(f"  {program}: does not fit")
            else:
                report.programs.append(dataclasses.replace(prog, compile_cpu_seconds=cpu))
                say(f"  {program}: compiled in {prog.compile_seconds:.1f} s ({cpu:.1f} s CPU)")
            done(report)
    return report


def _over(report: TopologyReport) -> list[str]:
    out = []
    for p in report.programs:
        if p.failure:
            out.append(p.failure)
        elif not p.fits:
            out.append(f"{p.name} does not fit on {report.topology.name}: {p.total / GiB:.2f} "
                       f"GiB per device of {p.hbm_per_device / GiB:.1f} GiB HBM.")  # fmt: skip
    return out


def _write_json(path: str, reports: list[TopologyReport]) -> None:
    F = flags.FLAGS
    payload = dict(
        model=f"Wan 2.1 T2V {F.wan}",
        overrides=[a for a in sys.argv[1:] if a.startswith("--config.")],
        full_depth=F.full_depth,
        jax_version=jax.__version__,
        reports=[r.to_json() for r in reports],
    )
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_library_logs()
    F = flags.FLAGS
    with cli.clear_errors():
        programs = [p for s in F.programs for p in s.split(",") if p]
        reports, failures = [], []
        for topology in F.topology:
            print(f"Compiling Wan {F.wan} {', '.join(programs)} for {topology} ...", flush=True)
            say = lambda m: print(m, flush=True)  # noqa: E731
            # After each program: the finished topologies and this one so far.
            done = (lambda r: _write_json(F.json, [*reports, r])) if F.json else None
            report = run(F.wan, F.config, topology, programs, sample_batch=F.sample_batch,
                         full_depth=F.full_depth, progress=say, on_program=done)  # fmt: skip
            print(format_report(report, f"Wan 2.1 {F.wan}"))
            reports.append(report)
            failures += _over(report)
        if F.json:
            _write_json(F.json, reports)
            print(f"Wrote {F.json}")
        if failures:
            raise DoesNotFit("\n".join(failures))


def _define_flags() -> None:
    base = _BASE
    help_ = "vdm config: mesh, rules, optim, batch (default configs/wan_finetune.py)."
    config_flags.DEFINE_config_file("config", base, help_, lock_config=True)
    flags.DEFINE_enum("wan", None, sorted(wan.PRESETS), "Wan 2.1 T2V model.")
    flags.DEFINE_multi_string("topology", None, "TPU topology, e.g. v5p:2x2x3 (repeatable).")
    flags.DEFINE_multi_string("programs", [DEFAULT_PROGRAMS], f"From {list(PROGRAMS)}.")
    flags.DEFINE_integer("sample_batch", None, "Videos per sampler call (default: data x fsdp).")
    flags.DEFINE_bool("full_depth", False, "Compile every block (default: extrapolate 1 and 2).")
    flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
    flags.mark_flags_as_required(["wan", "topology"])


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags_with_help)
