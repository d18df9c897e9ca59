"""Trains a vdm stage (autoencoder or denoiser). All logic lives in `vdm.train.loop`.

  python train.py --config configs/quickstart.py --workdir workdirs/quickstart \
      [--config.train.num_steps=1000 ...]

Resumes from --workdir when it holds a checkpoint. Multi-host: run the same command on every host
with --coordinator_address=HOST0:PORT --num_processes=N --process_id=I (or the JAX_* environment
variables; --auto_distributed lets JAX detect TPU pods / SLURM).
"""

from absl import app, flags
from ml_collections import config_flags

from vdm import cli, paths
from vdm import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_AUTO = flags.DEFINE_bool("auto_distributed", False, "Let JAX detect the cluster (TPU, SLURM).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from vdm import parallel
    from vdm.train import loop

    cli.quiet_library_logs()
    cli.enable_compilation_cache()
    with cli.clear_errors():
        parallel.initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_AUTO.value
        )
        config = _CONFIG.value
        config_lib.validate(config)
        paths.check_output_dir(_WORKDIR.value, "--workdir", create=False)
        loop.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_with_help)
