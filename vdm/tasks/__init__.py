"""Training stages by name. Each stage module defines one `Task` subclass."""

from vdm.tasks.alignment import AlignmentTask
from vdm.tasks.autoencoder import AutoencoderTask
from vdm.tasks.base import Task
from vdm.tasks.denoiser import DenoiserTask
from vdm.tasks.wan import WanTask

_STAGES: dict[str, type[Task]] = {
    "autoencoder": AutoencoderTask,
    "denoiser": DenoiserTask,
    "wan": WanTask,
    "alignment": AlignmentTask,
}


def get_task(config) -> Task:
    """The Task for `config.stage`."""
    return _STAGES[config.stage](config)
