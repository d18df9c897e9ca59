"""The frozen encoders a denoiser is trained and sampled with.

A denoiser learns on the latents of one VAE and the context of one text encoder; neither trains.
`FrozenEncoders` holds both, with what they imply: the VAE's latent statistics (which make latents
unit-variance) and the empty prompt's embedding (the null context of classifier-free guidance).

* `load(config)` reads the real weights: the VAE from `config.vae.checkpoint` (a training workdir
  or an exported model's `vae/`), the text encoder by `config.text_encoder.name`; a latent cache
  (`data.source = "cache:DIR"`) supplies the statistics it was built with.
* `abstract(config)` gives the same structure with `jax.ShapeDtypeStruct` params and no weights
  read, for ahead-of-time compiles (`vdm.tools.aot`): a T5-XXL is never downloaded or allocated.

Both go to `vdm.tasks.denoiser.DenoiserTask(config, encoders)`; the latent-cache builder and the
inference pipeline take them the same way, so no data or inference module reaches into a task.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm import parallel
from vdm.data import cache
from vdm.errors import UserError
from vdm.io import bundle, checkpoint
from vdm.models import autoencoder as ae
from vdm.models.text import architectures
from vdm.models.text import encoder as te

PyTree = Any


@dataclasses.dataclass(frozen=True)
class FrozenEncoders:
    """The frozen VAE and text encoder of a denoiser, with their derived inputs.

    Attributes:
      text: the text encoder (params plain, unboxed; abstract ones have no tokenizer).
      vae: the VAE module.
      vae_params: its (EMA) params, plain and unboxed.
      latent_stats: {"shift": [c], "scale": [c]}: z_normalized = (z - shift) / scale.
      null_ctx: float32 [1, L, D], the empty prompt's hidden states.
      null_mask: int32 [1, L], its token mask.
    """

    text: te.TextEncoder
    vae: ae.VideoAutoencoder
    vae_params: PyTree
    latent_stats: dict
    null_ctx: Any
    null_mask: Any

    def boxed(self, data_config) -> dict[str, PyTree]:
        """{"vae", "text"} params boxed with their logical axis names (sharded by the mesh rules:
        a T5-XXL is 9.5 GB, replicated it would take most of a chip).

        Args:
          data_config: `config.data` (the video shape the VAE is traced with).
        """
        d = data_config
        video = jax.ShapeDtypeStruct((1, d.num_frames, d.height, d.width, 3), jnp.float32)
        vae_axes = nn.get_partition_spec(jax.eval_shape(self.vae.init, jax.random.key(0), video))
        return {
            "vae": parallel.box(self.vae_params, vae_axes["params"]),
            "text": parallel.box(self.text.params, self.text.logical_axes()),
        }


def load_vae(config) -> tuple[ae.VideoAutoencoder, PyTree, dict]:
    """The VAE module, its (EMA) params and latent statistics from `config.vae.checkpoint`.

    With no checkpoint configured (tiny test configs only) the VAE is randomly initialised from the
    config seed and the statistics are identity; this is logged loudly because a real run needs a
    trained VAE.

    Raises:
      ValueError: the checkpoint has no latent statistics.
    """
    module = ae.VideoAutoencoder.from_config(config.vae)
    path = config.vae.checkpoint
    bundled = os.path.join(bundle.DEFAULT_MODEL, "vae")
    if path and os.path.realpath(path) == os.path.realpath(bundled):
        print(
            f"VAE: the bundled model's ({bundled}). To train with your own, train one with "
            "configs/vae_quickstart.py and pass --config.vae.checkpoint=WORKDIR.",
            flush=True,
        )
    if path:
        _check_vae_checkpoint(path)
        params = checkpoint.load_params(path, item="ema")
        stats = checkpoint.load_metadata(path).get("latent_stats")
        if stats is None:
            raise ValueError(
                f"VAE checkpoint '{path}' has no latent statistics in its metadata; re-export it "
                "with the current code (stage 'autoencoder' stores them at every checkpoint)."
            )
        return module, params, stats
    logging.warning(
        "config.vae.checkpoint is empty: using a RANDOMLY INITIALISED VAE (fine for tests, useless "
        "for real training). Train one with stage 'autoencoder' and set --config.vae.checkpoint."
    )
    t, h, w = config.data.num_frames, config.data.height, config.data.width
    video = jnp.zeros((1, t, h, w, 3), jnp.float32)
    params = jax.jit(module.init)(jax.random.key(config.seed), video)["params"]
    c = config.vae.latent_channels
    return module, params, {"shift": [0.0] * c, "scale": [1.0] * c}


def _check_vae_checkpoint(path: str) -> None:
    """Refuses a `config.vae.checkpoint` that is missing or not a VAE, naming it, before any
    weights are read (a denoiser's weights would fail later as a pytree-structure error)."""
    fix = (
        "Pass a VAE training workdir (stage 'autoencoder', e.g. from configs/vae_quickstart.py) "
        f"or an exported model's vae/ directory (the bundled one: {bundle.DEFAULT_MODEL}/vae)."
    )
    if bundle.is_bundle(path):
        raise UserError(
            f"config.vae.checkpoint='{path}' is a whole exported model; pass its VAE part, "
            f"'{os.path.join(path, 'vae')}'."
        )
    try:
        stage = checkpoint.stage_of(path)
    except FileNotFoundError as e:
        raise UserError(f"config.vae.checkpoint='{path}': {e} {fix}") from None
    if stage != "autoencoder":
        raise UserError(
            f"config.vae.checkpoint='{path}' is a checkpoint of stage '{stage}', not a VAE. {fix}"
        )


def load_text(config) -> te.TextEncoder:
    """The text encoder `config.text_encoder` names, with its weights."""
    t = config.text_encoder
    return te.load_text_encoder(t.name, max_length=t.max_length, dtype=jnp.dtype(t.dtype))


def _null_context(text: te.TextEncoder) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = text.tokenize([""])
    return np.asarray(text.encode(text.params, ids, mask), np.float32), np.asarray(mask)


def load(config) -> FrozenEncoders:
    """The real frozen encoders of `config` (see the module docstring).

    Raises:
      ValueError / FileNotFoundError: a VAE checkpoint or text encoder that cannot be read, or a
        latent cache built with other encoders or shapes (named).
    """
    vae, vae_params, stats = load_vae(config)  # first: a wrong VAE path fails before any download
    text = load_text(config)
    source = config.data.source
    if source.startswith("cache:"):
        manifest = cache.read_manifest(source.split(":", 1)[1])
        cache.check_compatible(manifest, config, config.data.train_split)
        stats = manifest["latent_stats"]
    null_ctx, null_mask = _null_context(text)
    return FrozenEncoders(text, vae, vae_params, stats, null_ctx, null_mask)


def abstract(config) -> FrozenEncoders:
    """`load(config)`'s structure with abstract params: nothing is read, downloaded or allocated.

    The latent statistics are placeholders (they are inputs of a program, not shapes).
    """
    t, d = config.text_encoder, config.data
    text = architectures.abstract_text_encoder(t.name, int(t.max_length), t.dtype)
    vae = ae.VideoAutoencoder.from_config(config.vae)
    video = jax.ShapeDtypeStruct((1, d.num_frames, d.height, d.width, 3), jnp.float32)
    vae_params = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), video)["params"])
    c = config.vae.latent_channels
    stats = {"shift": [0.0] * c, "scale": [1.0] * c}
    null_ctx = jax.ShapeDtypeStruct((1, text.max_length, text.dim), jnp.float32)
    null_mask = jax.ShapeDtypeStruct((1, text.max_length), jnp.int32)
    return FrozenEncoders(text, vae, vae_params, stats, null_ctx, null_mask)
