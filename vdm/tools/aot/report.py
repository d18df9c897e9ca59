"""What the compiler says about each program: the report types, their JSON, the fit check and
the tables.

Figures per device (see `chips.Topology` for what a device is):
  arguments / outputs / alias / temporaries / code: bytes from `compiled.memory_analysis()`;
  total = arguments + outputs - alias (donated buffers counted once) + temporaries + code.
  HLO FLOPs: `compiled.cost_analysis()["flops"]` of the partitioned program (per device; includes
  remat recomputation and the frozen encoders); see `vdm.tools.aot.programs` for the programs
  whose loops XLA counts once. XLA does not see inside Mosaic kernels, so with splash attention
  the analytic attention FLOPs are added (`programs.splash_flops`).
  model FLOPs: the denoiser's analytic matmul FLOPs (`Denoiser.flops_per_example`): 3x forward
  for a train step, 2 (guidance) x forward per sampler step.
  PROJECTION (no TPU was run): step time = max(HLO FLOPs / peak bf16 FLOP/s, XLA's TPU cost-model
  estimate "optimal_seconds"); MFU = model FLOPs / (step time x peak). Both are bounds a real run
  does not beat (communication, attention kernels and input pipelines are not modelled).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vdm.tools.aot.advice import DoesNotFit, knob_advice, oom_used_bytes
from vdm.tools.aot.chips import GiB, Topology


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
    compile_cpu_seconds: float | None = None  # process CPU time of its compile(s), if measured.

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


def memory(compiled) -> dict[str, int]:
    """The byte fields of a ProgramReport from `compiled.memory_analysis()`."""
    m = compiled.memory_analysis()
    return dict(
        arguments=int(m.argument_size_in_bytes),
        outputs=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        temporaries=int(m.temp_size_in_bytes),
        code=int(m.generated_code_size_in_bytes),
    )


def cost(compiled) -> tuple[float, float | None]:
    """(HLO FLOPs, cost-model seconds or None) from `compiled.cost_analysis()`."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per partition
        analysis = analysis[0] if analysis else {}
    seconds = analysis.get("optimal_seconds")
    flops = float(analysis.get("flops", 0.0))
    return flops, (float(seconds) if seconds and seconds > 0 else None)


def program_report(name: str, description: str, compiled, seconds: float, topology: Topology,
                   *, hlo_flops=None, model_flops=None, optimal=None) -> ProgramReport:  # fmt: skip
    """The ProgramReport of a compiled program; hlo_flops / optimal replace the compiler's."""
    flops, opt = cost(compiled)
    return ProgramReport(
        name=name,
        description=description,
        **memory(compiled),
        hlo_flops=flops if hlo_flops is None else hlo_flops,
        model_flops=model_flops,
        optimal_seconds=opt if optimal is None else optimal,
        compile_seconds=seconds,
        hbm_per_device=topology.hbm_per_device,
        peak_per_device=topology.peak_per_device,
        num_devices=len(topology.devices),
    )


def failed_report(name: str, message: str, topology: Topology) -> ProgramReport:
    """The report of a program the compiler refused: its out-of-memory message, no figures but
    the bytes the compiler said it needs (as temporaries)."""
    p = ProgramReport(name, "DOES NOT FIT: " + message.splitlines()[0], 0, 0, 0,
                      oom_used_bytes(message), 0, 0.0, None, None, 0.0, topology.hbm_per_device,
                      topology.peak_per_device, len(topology.devices))  # fmt: skip
    p.failure = message
    return p


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
