"""Stage "autoencoder": trains the causal video VAE (vdm.models.autoencoder) on videos.

Loss per example (then the batch mean):

    recon(x_hat, x) + kl_weight * KL(q(z|x) || N(0, I)) / (T * H * W * 3)

* recon is "l1+l2" (mean |d| + mean d^2) or "charbonnier" (mean sqrt(d^2 + eps^2) - eps) over
  all pixel values in [-1, 1]; d = x_hat - x and x_hat decodes a posterior *sample*.
* The KL is summed over latent elements and divided by the number of pixel values, i.e. the
  ratio of sums of the Stable Diffusion VAE (sum-reduced NLL + beta * summed KL, beta ~ 1e-6)
  written per pixel value, so `kl_weight` means the same for every resolution.

`vae.train_frames > 0` trains on a random window of that many frames of each batch (one window
per step, the same for the batch), e.g. 9 of 17 at half the cost. The causal convolutions'
receptive field can span more latent frames than a short window holds, so frames beyond the window
length are never trained with their full history: train on whole clips, or fine-tune the decoder
on them afterwards (configs/vae_quickstart_decoder.py; the measured effect is in
docs/experiments.md). Evaluation always uses whole clips.

Perceptual (LPIPS) and adversarial losses are not implemented: LPIPS needs downloaded weights
and a GAN needs a second optimizer. Their config weights must stay 0.

Evaluation (`evaluate`) reconstructs `train.eval_batches` held-out batches through the inference
path (posterior mean, streaming decode), quantizes to uint8 as a user would see it, and reports
PSNR and SSIM (dB, per-example means) plus a side-by-side contact sheet. `metadata` computes the
per-channel latent statistics over `vae.stats_num_examples` training videos; the denoiser stage
reads them back from the checkpoint's "metadata" item.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from vdm.data import loader as data_loader
from vdm.errors import ConfigError
from vdm.eval import metrics
from vdm.io import video as video_io
from vdm.models import autoencoder as ae
from vdm.models import latent_stats as stats_lib
from vdm.rng import stream
from vdm.tasks.base import PyTree, Task

log = logging.getLogger(__name__)

RECON_LOSSES = ("l1+l2", "charbonnier")
CHARBONNIER_EPS = 1e-3


def _make_loader(config, split, **kwargs):
    """The data loader (a seam the tests replace with synthetic batches)."""
    return data_loader.make_loader(config, split, **kwargs)


def reconstruction_loss(recon: jax.Array, video: jax.Array, kind: str) -> jax.Array:
    """Per-example reconstruction loss [B], a mean over all pixel values.

    Args:
      recon, video: [B, ...] in [-1, 1].
      kind: "l1+l2" (mean |d| + mean d^2) or "charbonnier" (mean sqrt(d^2 + eps^2) - eps, a
        smooth L1 that is quadratic within eps = 1e-3 of the target).
    """
    d = (recon - video).reshape(video.shape[0], -1)
    if kind == "charbonnier":
        return jnp.mean(jnp.sqrt(d * d + CHARBONNIER_EPS**2) - CHARBONNIER_EPS, axis=-1)
    if kind == "l1+l2":
        return jnp.mean(jnp.abs(d), axis=-1) + jnp.mean(d * d, axis=-1)
    raise ValueError(f"Unknown reconstruction loss {kind!r}; valid: {RECON_LOSSES}.")


class AutoencoderTask(Task):
    """Trains `VideoAutoencoder.from_config(config.vae)` on `config.data` videos."""

    def __init__(self, config: ConfigDict):
        super().__init__(config)
        v = config.vae
        if v.recon_loss not in RECON_LOSSES:
            raise ConfigError(
                f"config.vae.recon_loss={v.recon_loss!r} is not one of {RECON_LOSSES}."
            )
        for name, why in (
            ("perceptual_weight", "a perceptual (LPIPS) loss needs downloaded network weights"),
            ("adversarial_weight", "a GAN loss needs a discriminator and a second optimizer"),
        ):
            if float(v[name]) != 0.0:
                raise ConfigError(
                    f"config.vae.{name}={v[name]} but this loss is not implemented ({why}); "
                    f"set --config.vae.{name}=0."
                )
        try:
            self.module = ae.VideoAutoencoder.from_config(v)
            self.latent_shape = ae.latent_shape(
                v, config.data.num_frames, config.data.height, config.data.width
            )
        except ValueError as e:
            raise ConfigError(f"{e} (from config.data / config.vae)") from None
        self.train_frames = int(v.get("train_frames", 0) or 0)
        if self.train_frames:
            ft, T = self.module.temporal_factor, config.data.num_frames
            if (self.train_frames - 1) % ft or not 1 <= self.train_frames <= T:
                raise ConfigError(
                    f"config.vae.train_frames={self.train_frames} must be 0 (whole clips) or "
                    f"1 + k*{ft} <= data.num_frames={T}."
                )
        self._jitted = {}

    # ---- Task API ---------------------------------------------------------------------------

    @property
    def tokens_per_example(self) -> int:
        """Pixels per training video (for the loop's throughput log)."""
        d = self.config.data
        return int(d.num_frames * d.height * d.width)

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        d = self.config.data
        return {"video": np.zeros((batch_size, d.num_frames, d.height, d.width, 3), np.float32)}

    def init(self, key: jax.Array, batch: dict[str, jax.Array]) -> PyTree:
        return self.module.init({"params": key}, batch["video"])["params"]

    def loss(self, params, frozen, batch, key):
        video = batch["video"]
        if self.train_frames and self.train_frames < video.shape[1]:
            start = jax.random.randint(
                stream(key, "crop"), (), 0, video.shape[1] - self.train_frames + 1
            )
            video = jax.lax.dynamic_slice_in_dim(video, start, self.train_frames, axis=1)
        recon, mean, logvar = self.module.apply({"params": params}, video, stream(key, "posterior"))
        rec = reconstruction_loss(recon, video, self.config.vae.recon_loss)
        kl = ae.kl_divergence(mean, logvar) / math.prod(video.shape[1:])
        per_example = rec + self.config.vae.kl_weight * kl
        mse = jnp.mean(jnp.square(recon - video).reshape(video.shape[0], -1), axis=-1)
        out = {
            "recon": jnp.mean(rec),
            "kl": jnp.mean(kl),
            "mse": jnp.mean(mse),
            "psnr": jnp.mean(metrics.psnr(recon, video, 2.0)),
            "latent_std": jnp.std(mean),
            "posterior_logvar": jnp.mean(logvar),
        }
        return jnp.mean(per_example), out

    def device_batch(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        video = np.asarray(batch["video"])
        if video.dtype != np.uint8:
            raise ValueError(f"Expected uint8 videos from the data pipeline; got {video.dtype}.")
        return {"video": ae.from_uint8(np.asarray(video))}

    def evaluate(self, params, frozen, step: int, workdir: str) -> dict[str, float]:
        cfg = self.config
        loader = _make_loader(
            cfg,
            cfg.data.eval_split,
            batch_size=cfg.train.batch_size,
            shuffle=False,
            seed=int(cfg.seed),
            num_epochs=1,
            # Every process evaluates the same batches, so all see the same numbers and the
            # (replicated) host batch is consistent with globally sharded params.
            process_index=0,
            process_count=1,
        )
        reconstruct = self._jit("reconstruct", self._reconstruct)
        psnrs, ssims, originals, recons = [], [], [], []
        for i, batch in enumerate(loader):
            if i >= cfg.train.eval_batches:
                break
            video = np.asarray(batch["video"])
            recon = ae.to_uint8(np.asarray(reconstruct(params, ae.from_uint8(np.asarray(video)))))
            psnrs.append(metrics.psnr(video, recon, 255.0))
            frames_fit = min(video.shape[2:4]) >= 11
            if frames_fit:
                ssims.append(metrics.ssim(video, recon, 255.0))
            if sum(len(o) for o in originals) < cfg.train.num_preview_samples:
                originals.append(video)
                recons.append(recon)
        if not psnrs:
            raise ValueError(
                f"Evaluation split '{cfg.data.eval_split}' gave no batch of "
                f"{cfg.train.batch_size} videos; use a smaller train.batch_size or more data."
            )
        psnr = np.concatenate(psnrs)
        # Exact reconstructions give inf; cap at 100 dB so the mean stays a number.
        out = {"psnr": float(np.mean(np.minimum(psnr, 100.0)))}
        if ssims:
            out["ssim"] = float(np.mean(np.concatenate(ssims)))
        if jax.process_index() == 0 and originals:
            n = cfg.train.num_preview_samples
            path = os.path.join(workdir, "previews", f"reconstructions_{step:08d}.png")
            write_comparison(np.concatenate(originals)[:n], np.concatenate(recons)[:n], path)
        return out

    def metadata(self, params, frozen) -> dict[str, Any]:
        """{"latent_stats": {"shift", "scale", "count"}, "vae": the resolved architecture}.

        Encodes `vae.stats_num_examples` training videos, so it costs a few seconds per save."""
        vae = ae.resolve_vae_config(self.config.vae)
        vae["channel_multipliers"] = list(vae["channel_multipliers"])
        return {"latent_stats": self.latent_stats(params), "vae": vae}

    # ---- helpers ----------------------------------------------------------------------------

    def latent_stats(self, params, num_examples: int | None = None) -> dict[str, Any]:
        """Per-channel latent shift/scale over the first training videos (unshuffled).

        Args:
          params: VAE parameters.
          num_examples: videos to encode (default `config.vae.stats_num_examples`).

        Returns:
          `vdm.models.latent_stats.compute_latent_stats` output ({"shift", "scale", "count"}).
        """
        cfg = self.config
        n = int(num_examples or cfg.vae.get("stats_num_examples", 256))
        batch_size = max(1, min(cfg.train.batch_size, n))
        loader = _make_loader(
            cfg,
            cfg.data.train_split,
            batch_size=batch_size,
            shuffle=False,
            seed=int(cfg.seed),
            num_epochs=1,
            process_index=0,  # the same videos on every host -> identical stats.
            process_count=1,
        )
        encode = self._jit("encode", lambda p, v: ae.encode(self.module, p, v))
        latents, seen = [], 0
        for batch in loader:
            latents.append(np.asarray(encode(params, ae.from_uint8(np.asarray(batch["video"])))))
            seen += len(latents[-1])
            if seen >= n:
                break
        return stats_lib.compute_latent_stats(latents)

    def _reconstruct(self, params, video):
        z = ae.encode(self.module, params, video)
        return ae.decode(self.module, params, z, chunk=int(self.config.vae.decode_chunk))

    def _jit(self, name, fn):
        if name not in self._jitted:
            self._jitted[name] = jax.jit(fn)
        return self._jitted[name]


def write_comparison(originals: np.ndarray, recons: np.ndarray, path: str) -> np.ndarray:
    """A PNG with, per video, a row of original frames above a row of reconstructed frames.

    Args:
      originals, recons: uint8 [N, T, H, W, 3].
      path: PNG path (directories are created).

    Returns:
      The sheet, uint8 [H_sheet, W_sheet, 3].
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rows, captions = [], []
    for i, (o, r) in enumerate(zip(originals, recons, strict=True)):
        rows += [o, r]
        captions += [f"#{i} original", f"#{i} reconstruction"]
    scale = 2 if originals.shape[2] <= 64 else 1
    return video_io.contact_sheet(rows, captions, path, max_frames=None, scale=scale)
