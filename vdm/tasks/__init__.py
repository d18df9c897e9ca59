"""Training stages by name. Each stage module defines one `Task` subclass."""

import importlib

from vdm.tasks.base import Task

_STAGES = {
    "autoencoder": "vdm.tasks.autoencoder:AutoencoderTask",
    "denoiser": "vdm.tasks.denoiser:DenoiserTask",
}


def get_task(config) -> Task:
    """The Task for `config.stage`."""
    module, cls = _STAGES[config.stage].split(":")
    return getattr(importlib.import_module(module), cls)(config)
