"""How to sample: the settings sample.py, eval.py, the pipeline and export share.

    settings = SamplingSettings.from_config(config.sample)          # a model's defaults
    settings = settings.override(num_steps=10, guidance=None)       # None keeps the default

Each value a user can give is checked with a message naming its flag (`--num_steps`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vdm.diffusion import samplers, schedules
from vdm.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Sampler settings (`config.sample`'s fields).

    Attributes:
      sampler: "euler", "ddim", "dpmpp2m" or "unipc" (`vdm.diffusion.samplers.SAMPLERS`).
      num_steps: denoiser evaluations, >= 1.
      guidance: classifier-free guidance scale.
      eta: stochasticity of ddim / dpmpp2m (0 = the deterministic ODE solver), >= 0.
      negative_prompt: the prompt guidance steers away from ("" = unconditional).
      shift: the flow sampling time shift; None = the training `diffusion.shift`.
      time_grid: the times the sampler visits (`vdm.diffusion.schedules.TIME_GRIDS`): vdm's
        "uniform", or a diffusers scheduler's grid for a pretrained model tuned on it.
    """

    sampler: str
    num_steps: int
    guidance: float
    eta: float
    negative_prompt: str
    shift: float | None = None
    time_grid: str = "uniform"

    def __post_init__(self):
        check(**dataclasses.asdict(self))
        for name, kind in (("num_steps", int), ("guidance", float), ("eta", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.shift is not None:
            object.__setattr__(self, "shift", float(self.shift))

    @classmethod
    def from_config(cls, sample_config) -> SamplingSettings:
        """The defaults a model's `config.sample` records."""
        s = sample_config
        return cls(
            sampler=s.sampler,
            num_steps=s.num_steps,
            guidance=s.guidance,
            eta=s.eta,
            negative_prompt=s.negative_prompt,
            shift=s.get("shift"),
            time_grid=s.get("time_grid", "uniform"),
        )

    def override(self, **values: Any) -> SamplingSettings:
        """These settings with `values` (field name -> value) replaced; None values are ignored.

        Raises:
          UserError: an unknown field, or a value out of range (naming its flag).
        """
        check(**values)
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingSettings))


def check(**values: Any) -> None:
    """Checks setting values (None = not given) before any work; raises UserError naming the
    flag of the first bad one."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"Unknown sampling setting(s) {unknown}; valid: {list(FIELDS)}.")
    v = {k: x for k, x in values.items() if x is not None}
    if "negative_prompt" in v and not isinstance(v["negative_prompt"], str):
        raise UserError(f"--negative_prompt must be a string, got {v['negative_prompt']!r}.")
    if "sampler" in v and v["sampler"] not in samplers.SAMPLERS:
        raise UserError(
            f"Unknown sampler '{v['sampler']}' (--sampler); choose one of "
            f"{sorted(samplers.SAMPLERS)}."
        )
    if "num_steps" in v and not int(v["num_steps"]) >= 1:
        raise UserError(f"--num_steps must be >= 1, got {v['num_steps']}.")
    if "guidance" in v and not math.isfinite(float(v["guidance"])):
        raise UserError(f"--guidance must be a finite number, got {v['guidance']}.")
    if "eta" in v and not (math.isfinite(float(v["eta"])) and float(v["eta"]) >= 0):
        raise UserError(
            f"--eta must be a finite number >= 0 (0 = the deterministic ODE solver), got "
            f"{v['eta']}."
        )
    if "time_grid" in v and v["time_grid"] not in schedules.TIME_GRIDS:
        raise UserError(
            f"Unknown time grid '{v['time_grid']}' (sample.time_grid); choose one of "
            f"{list(schedules.TIME_GRIDS)}."
        )
    if "shift" in v and not (math.isfinite(float(v["shift"])) and float(v["shift"]) > 0):
        raise UserError(f"--shift must be a finite number > 0 (1 = no shift), got {v['shift']}.")
