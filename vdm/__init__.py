"""vdm: text-to-video latent diffusion in JAX/Flax.

Data flow: caption -> tokenizer -> frozen text encoder -> context; video -> causal 3D VAE ->
latents; a factorized space-time transformer denoises latents conditioned on the context;
samplers are one `jax.lax.scan` over steps; the VAE decoder streams latents back to frames.
"""

import jax

# Random bits depend only on the key and the array's global shape, never on how it is sharded, so
# the same seed gives the same video on 1 device or a pod (DESIGN.md: RNG).
jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"


def load_pipeline(path=None, **kwargs):
    """Loads a text-to-video pipeline from a checkpoint directory (default: the bundled model)."""
    from vdm.pipeline import load_pipeline as _load

    return _load(path, **kwargs)
