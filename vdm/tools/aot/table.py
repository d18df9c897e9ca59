"""A TopologyReport as Markdown tables (also readable in a terminal)."""

from __future__ import annotations

from vdm.tools.aot.chips import GiB
from vdm.tools.aot.report import ProgramReport, TopologyReport


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


def _memory_row(p: ProgramReport) -> str:
    if p.fits:
        fits = "yes"
    elif p.total > p.hbm_per_device:
        fits = f"**NO** (+{_gib(p.total - p.hbm_per_device)})"
    else:
        fits = "**NO** (compiler)"
    return (
        f"| {p.name} | {_gib(p.arguments)} | {_gib(p.outputs)} | {_gib(p.alias)} | "
        f"{_gib(p.temporaries)} | {_gib(p.code)} | {_gib(p.total)} | "
        f"{_gib(p.hbm_per_device)} | {fits} |"
    )


def _cost_row(p: ProgramReport) -> str:
    mfu = p.projected_mfu
    return (
        f"| {p.name} | {_si(p.hlo_flops)} | {_si(p.model_flops)} | "
        f"{_seconds(p.seconds_at_peak)} | {_seconds(p.optimal_seconds)} | "
        f"{_seconds(p.projected_seconds)} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
        f"{p.compile_seconds:.1f} s |"
    )


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
        *(_memory_row(p) for p in report.programs),
        "",
        "| program | HLO FLOPs / device | model FLOPs (global) | time at peak | XLA cost model | "
        "**projected** step time | **projected** MFU | compile |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(_cost_row(p) for p in report.programs),
        "",
        *(f"- {p.name}: {p.description}" for p in report.programs),
        "",
        "Projection, not a measurement: step time = max(HLO FLOPs / peak, XLA cost model); "
        "MFU = model FLOPs / devices / (step time x peak).",
        "",
    ]
    return "\n".join(lines)
