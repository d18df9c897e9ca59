"""Training stages by name. Each stage module defines one `Task` subclass."""

from vdm.tasks.alignment import AlignmentTask
from vdm.tasks.autoencoder import AutoencoderTask
from vdm.tasks.base import Task
from vdm.tasks.denoiser import DenoiserTask

_STAGES: dict[str, type[Task]] = {
    "autoencoder": AutoencoderTask,
    "denoiser": DenoiserTask,
    "alignment": AlignmentTask,
}


def get_task(config) -> Task:
    """The Task for `config.stage`."""
    return _STAGES[config.stage](config)
