"""`python -m vdm.tools.aot`: compile a config's programs for TPU topologies, print the tables,
optionally write JSON, and exit with DoesNotFit's message when a program is over its HBM."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from vdm import cli
from vdm import config as config_lib
from vdm.tools.aot.abstract import FROZEN_SHARDINGS
from vdm.tools.aot.advice import DoesNotFit
from vdm.tools.aot.programs import PROGRAMS
from vdm.tools.aot.report import TopologyReport, check_fit
from vdm.tools.aot.runner import run
from vdm.tools.aot.table import format_report


def _write_json(path: str, config_filename: str | None, reports: list[TopologyReport]) -> None:
    payload = dict(
        config=config_filename,
        overrides=[a for a in sys.argv[1:] if a.startswith("--config.")],
        jax_version=jax.__version__,
        reports=[r.to_json() for r in reports],
    )
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"Wrote {path}")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_library_logs()
    F = flags.FLAGS
    with cli.clear_errors():
        config = F.config
        config_lib.validate(config)
        programs = [p for s in F.programs for p in s.split(",") if p]
        reports, failures = [], []
        for name in F.topology:
            print(f"Compiling {', '.join(programs)} for {name} ...", flush=True)
            report = run(config, name, programs, sample_batch=F.sample_batch,
                         frozen_sharding=F.frozen_sharding, count_flops=F.count_flops,
                         progress=lambda m: print(m, flush=True))  # fmt: skip
            print(format_report(report, os.path.basename(F["config"].config_filename or "")))
            reports.append(report)
            try:
                check_fit(report, config)
            except DoesNotFit as e:
                failures.append(str(e))
        if F.json:
            _write_json(F.json, F["config"].config_filename, reports)
        if failures:
            raise DoesNotFit("\n".join(failures))


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_multi_string("topology", None, "TPU topology, e.g. v5p:4x4x4 (repeatable).")
    flags.DEFINE_multi_string(
        "programs", [",".join(PROGRAMS)], f"Programs to compile, from {list(PROGRAMS)}."
    )
    flags.DEFINE_integer("sample_batch", None, "Videos per sampler call (default: data x fsdp).")
    flags.DEFINE_enum(
        "frozen_sharding", "rules", list(FROZEN_SHARDINGS),
        "Frozen VAE / text-encoder weights: sharded by the logical-axis rules or replicated.",
    )  # fmt: skip
    flags.DEFINE_bool(
        "count_flops", True,
        "Scanned train step: also compile unrolled depth 1 and 2 for FLOPs (else memory only).",
    )  # fmt: skip
    flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags_with_help)
