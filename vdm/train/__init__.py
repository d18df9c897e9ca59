"""Training, shared by every stage: a `vdm.tasks.Task` says what is learned, this package the rest.

* `optim`: the optimizer, learning-rate schedule, `optim.freeze` and EMA.
* `state`: `TrainState` and how it is created sharded.
* `step`: the pure train step and the factory that compiles it for the run's layout.
* `setup`: everything built once before training (`build`), reused by the loop, bench/, the
  tests and `vdm.tools.aot`.
* `hooks`: the parts of the loop body (metrics, throughput, NaN guard, checkpoints, evaluation,
  preemption).
* `loop`: `train_and_evaluate`, the loop itself.
"""

import logging

import jax

log = logging.getLogger("vdm.train")


def say(message: str) -> None:
    """Prints a progress line on process 0 (every process logs it)."""
    if jax.process_index() == 0:
        print(message, flush=True)
    log.info(message)
