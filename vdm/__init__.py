"""vdm: text-to-video latent diffusion in JAX/Flax.

Data flow: caption -> tokenizer -> frozen text encoder -> context; video -> causal 3D VAE ->
latents; a factorized space-time transformer denoises latents conditioned on the context;
samplers are one `jax.lax.scan` over steps; the VAE decoder streams latents back to frames.
"""

import glob
import importlib.util
import os

# What libtpu reads from a TPU VM's metadata server. Any well-formed values silence its warnings
# on a host without one (vdm.tools.aot uses them too, to compile for a topology).
TPU_PLACEHOLDER_ENV = {
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_SKIP_MDS_QUERY": "1",
}


def _quiet_libtpu_without_tpu() -> None:
    """On a host without TPU chips, keeps an installed libtpu from printing warnings and an
    "E0000 ... INVALID_ARGUMENT" line at every start.

    libtpu is there when the `tpu-aot` / `test` extras are installed (vdm.tools.aot compiles
    with it). JAX then tries a TPU backend on every host, and libtpu complains that it cannot find
    the TPU VM's accelerator type and worker hostnames before JAX falls back to CPU / GPU. With
    harmless placeholder values it fails quietly instead. Nothing is set on a TPU VM (TPU device
    nodes present), or when the user set any of these variables.
    """
    if importlib.util.find_spec("libtpu") is None or glob.glob("/dev/accel*") + glob.glob(
        "/dev/vfio/[0-9]*"
    ):
        return
    for key, value in TPU_PLACEHOLDER_ENV.items():
        os.environ.setdefault(key, value)


_quiet_libtpu_without_tpu()

import jax  # noqa: E402

# Random bits depend only on the key and the array's global shape, never on how it is sharded, so
# the same seed gives the same video on 1 device or a pod.
jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"

# After the jax setting above: everything vdm computes sees it.
from vdm.inference.load import load_pipeline  # noqa: E402

__all__ = ["TPU_PLACEHOLDER_ENV", "__version__", "load_pipeline"]
