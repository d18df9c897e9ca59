"""Stage "denoiser": learn to denoise VAE latents conditioned on caption embeddings.

Frozen inputs (passed to the step as arguments, never trained): the latent statistics that make
latents unit-variance, the null (empty-prompt) embedding used both for classifier-free-guidance
dropout and for unconditional sampling, and — when the step encodes raw videos and captions —
the VAE and the text encoder. The encoders' weights carry their logical axis names, so they are
sharded by the mesh rules like the trained params (a T5-XXL is 9.5 GB: replicated it would take
most of a chip). A step on a latent cache never reads them and does not take them at all.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from vdm import encoders as encoders_lib
from vdm import rng
from vdm.data import cache
from vdm.diffusion import losses
from vdm.encoders import FrozenEncoders
from vdm.errors import UserError
from vdm.eval import digits
from vdm.inference import alignment, pipeline
from vdm.io import video as video_io
from vdm.models import autoencoder as ae
from vdm.models import denoiser as dn
from vdm.tasks.base import Task


def _as_array(x, dtype):
    """x as a jnp array of `dtype`; an abstract `ShapeDtypeStruct` stays abstract."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype)
    return jnp.asarray(x, dtype)


class DenoiserTask(Task):
    """Latent flow matching / diffusion on frozen VAE latents and frozen text embeddings.

    Two kinds of batches: raw (`video` uint8 + captions, encoded inside the step) or cached
    (`config.data.source = "cache:DIR"` built by `python -m vdm.tools.cache`: posterior
    `latent_mean` / `latent_logvar` and text `context` / `context_mask`, so the step runs the
    denoiser alone). Both draw the same posterior sample `mean + exp(logvar / 2) * eps`.
    """

    def __init__(self, config, encoders: FrozenEncoders | None = None):
        """
        Args:
          config: the run config.
          encoders: the frozen VAE and text encoder (default: `vdm.encoders.load(config)`;
            `vdm.encoders.abstract(config)` for ahead-of-time compiles).
        """
        super().__init__(config)
        enc = encoders_lib.load(config) if encoders is None else encoders
        self.encoders = enc
        self.text, self.vae, self.latent_stats = enc.text, enc.vae, enc.latent_stats
        d = config.data
        self.latent_shape = ae.latent_shape(config.vae, d.num_frames, d.height, d.width)
        self.model = dn.Denoiser.from_config(config.model, config.vae.latent_channels)
        self.cached = d.source.startswith("cache:")

    @property
    def tokens_per_example(self) -> int:
        """Denoiser tokens per video (latent t*h*w over the patch), for tokens/s in the logs."""
        t, h, w, _ = self.latent_shape
        pt, ph, pw = self.config.model.patch_size
        return (t // pt) * (h // ph) * (w // pw)

    # -- Task contract ---------------------------------------------------------------------------
    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        d, length = self.config.data, self.text.max_length
        mask = np.ones((batch_size, length), np.int32)
        if self.cached:
            z = np.zeros((batch_size, *self.latent_shape), np.float16)
            ctx = np.zeros((batch_size, length, self.text.dim), np.float16)
            return {"latent_mean": z, "latent_logvar": z, "context": ctx, "context_mask": mask}
        video = np.zeros((batch_size, d.num_frames, d.height, d.width, 3), np.uint8)
        return {"video": video, "ids": np.zeros_like(mask), "mask": mask}

    def init(self, key, batch):
        b = next(iter(batch.values())).shape[0]
        z = jnp.zeros((b, *self.latent_shape), jnp.float32)
        ctx = jnp.zeros((b, self.text.max_length, self.text.dim), jnp.float32)
        t = jnp.zeros((b,), jnp.float32)
        mask = jnp.ones((b, self.text.max_length), jnp.int32)
        return self.model.init(key, z, t, ctx, mask)["params"]

    @property
    def vae_params(self):
        """The frozen VAE's (EMA) params as loaded (host arrays, no axis names)."""
        return self.encoders.vae_params

    def frozen(self):
        """Latent statistics, the null caption and (raw-video steps only) `encoders()`."""
        return {
            **({} if self.cached else self.encoders.boxed(self.config.data)),
            "shift": jnp.asarray(self.latent_stats["shift"], jnp.float32),
            "scale": jnp.asarray(self.latent_stats["scale"], jnp.float32),
            "null_ctx": _as_array(self.encoders.null_ctx, jnp.float32),
            "null_mask": _as_array(self.encoders.null_mask, jnp.int32),
        }

    def device_batch(self, batch):
        if self.cached:
            keys = ("latent_mean", "latent_logvar", "context", "context_mask")
            return {k: np.asarray(batch[k]) for k in keys}
        ids, mask = self.text.tokenize([str(c) for c in batch["caption"]])
        return {"video": np.asarray(batch["video"]), "ids": ids, "mask": mask}

    def latents_and_context(self, frozen, batch, key):
        """Normalized posterior-sample latents and the caption context of a device batch."""
        if "latent_mean" in batch:
            mean = batch["latent_mean"].astype(jnp.float32)
            std = jnp.exp(0.5 * batch["latent_logvar"].astype(jnp.float32))
            z = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
            ctx, mask = batch["context"].astype(jnp.float32), batch["context_mask"]
        else:
            x = ae.from_uint8(batch["video"])
            z = ae.encode(self.vae, frozen["vae"], x, key=key)
            mask = batch["mask"]
            ctx = self.text.encode(frozen["text"], batch["ids"], mask)
        return (z - frozen["shift"]) / frozen["scale"], ctx, mask

    def loss(self, params, frozen, batch, key):
        frozen = jax.lax.stop_gradient(frozen)
        z0, ctx, mask = self.latents_and_context(frozen, batch, rng.stream(key, "vae"))
        null_cond = (
            jnp.broadcast_to(frozen["null_ctx"], ctx.shape),
            jnp.broadcast_to(frozen["null_mask"], mask.shape),
        )

        per_example = losses.diffusion_loss(
            dn.model_fn(self.model, params),
            z0,
            (ctx, mask),
            key,
            self.config.diffusion,
            null_cond=null_cond,
        )
        return per_example.mean(), {"latent_std": z0.std()}

    def metadata(self, params, frozen):
        return {
            "vae_checkpoint": os.path.abspath(self.config.vae.checkpoint)
            if self.config.vae.checkpoint
            else "",
            "text_encoder": self.config.text_encoder.name,
            "latent_stats": {
                k: [float(x) for x in v] if isinstance(v, list | tuple | np.ndarray) else v
                for k, v in self.latent_stats.items()
            },
            "latent_shape": list(self.latent_shape),
        }

    def pipeline(self, params, frozen) -> pipeline.Pipeline:
        """The inference pipeline of this task's modules with the given (EMA) denoiser params."""
        return pipeline.Pipeline(
            config=self.config,
            text=self.text,
            vae=self.vae,
            # A step on a latent cache has no VAE among its frozen inputs: use the host copy.
            vae_params=frozen.get("vae", self.vae_params),
            latent_stats=self.latent_stats,
            model=self.model,
            params=params,
        )

    def _aligner(self, pipe):
        """An `Aligner` for `pipe` (`config.alignment.checkpoint`, else the bundled one), or None
        when none fits this model (said once). The weights are read once; the Aligner is made
        per evaluation because it holds the pipeline, whose params the next step donates."""
        if not hasattr(self, "_alignment_weights"):
            try:
                a = alignment.load_aligner(pipe)
                self._alignment_weights = (a.model, a.params, a.source)
            except UserError as e:
                print(f"In-training evaluation: no alignment score ({e})", flush=True)
                self._alignment_weights = None
        if self._alignment_weights is None:
            return None
        model, params, source = self._alignment_weights
        return alignment.Aligner(model, params, pipe, source)

    def evaluate(self, params, frozen, step, workdir):
        """Samples test prompts with the given (EMA) params, scores them with the project's
        metrics (moving digits only), with the alignment score (`eval/alignment`, any data) when
        an alignment model fits, and writes a contact sheet of previews."""
        pipe = self.pipeline(params, frozen)
        metrics = {}
        n = self.config.eval.during_training
        data_kind = cache.underlying_source(self.config.data.source).split(":", 1)[0]
        if n and data_kind == "moving_digits":
            metrics, videos, prompts = digits.evaluate_pipeline(pipe, n, seed=self.config.seed)
        else:
            prompts = list(pipeline.PREVIEW_PROMPTS)
            videos = pipe(prompts, seed=self.config.seed)
        aligner = self._aligner(pipe) if n else None
        if aligner is not None:  # works on any data: the score of the videos with their prompts
            metrics["alignment"] = float(aligner.score_videos(videos, prompts).mean())
        del aligner
        if jax.process_index() == 0:
            k = self.config.train.num_preview_samples
            path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            video_io.contact_sheet(videos[:k], captions=prompts[:k], path=path)
        del pipe  # holds the params, which the next train step donates
        return {f"eval/{k}": v for k, v in metrics.items()}
