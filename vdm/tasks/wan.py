"""Stage "wan": fine-tune a Wan 2.1 text-to-video DiT on a latent cache (configs/wan_finetune.py).

The parameters start from the Diffusers-format pipeline `config.model.pretrained` (a directory or
a hub id already in the local cache): `pretrained` reads its `transformer/` weights straight onto
the mesh, each with the sharding its logical axis names give; `train.init_from` (an earlier
"wan" run) replaces them. With `optim.lora_rank > 0` the same weights are LoRA's frozen base
(`vdm.tasks.lora`) and only adapters train. Sampling and export: `vdm.inference.wan` and
`vdm.tools.export_wan`.

Data: `config.data.source = "cache:DIR"` only, a latent cache built with the pipeline's own VAE
and UMT5 (`python -m vdm.tools.cache --config configs/wan_finetune.py ...`); its manifest records
the pipeline and a cache of another model is refused. The VAE and text encoder are never loaded
while training.

The objective is Wan's flow matching, as diffusers' WanPipeline samples it:
  z0   = (mu - latents_mean) / latents_std, mu the VAE posterior mean (Wan's own `vae.encode`
         returns the mean, not a sample), per channel with the VAE config's statistics;
  x_t  = (1 - t) z0 + t eps, t = shift(u) = s u / (1 + (s - 1) u), u ~ `diffusion.time_sampling`;
  loss = || v(x_t, 1000 t, ctx) - (eps - z0) ||^2, v the DiT (diffusers' timestep units).
The default is u ~ U(0, 1) shifted with the pipeline scheduler's `flow_shift` (3.0 for the 1.3B
480p model): training times then follow the shifted schedule the sampler's steps visit, so the
noise levels that decide layout and motion get the most updates (public Wan fine-tuning code,
e.g. DiffSynth-Studio, likewise draws uniform steps of a shifted schedule; stated from memory).
`diffusion.time_sampling = "logit_normal"` (SD3's, mass mid-path) is the alternative.
`ctx` is UMT5's hidden states with zeros past each prompt (Wan's padding); with probability
`diffusion.cfg_dropout` it is the empty prompt's (the cache's null context), which
classifier-free guidance needs.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from vdm.data import cache
from vdm.diffusion import losses
from vdm.errors import ConfigError
from vdm.models.wan import files
from vdm.models.wan import finetune as wan_finetune
from vdm.models.wan import pipeline as wan_pipeline
from vdm.models.wan import text as wan_text
from vdm.models.wan.transformer import WanTransformer
from vdm.models.wan.transformer_weights import fill_params, transformer_dir
from vdm.tasks.base import Task


def pipeline_root(config) -> str:
    """The local directory of `config.model.pretrained` (ConfigError when it is not one)."""
    name = str(config.model.get("pretrained", "") or "")
    if not name:
        raise ConfigError(
            "stage 'wan' fine-tunes a Wan 2.1 pipeline: set model.pretrained to its "
            "Diffusers-format directory or hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)."
        )
    try:
        return os.path.abspath(files.pipeline_dir(name))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.pretrained={name!r}: {e}") from None


def _cache_dir(config) -> str:
    source = str(config.data.source)
    if not source.startswith("cache:"):
        raise ConfigError(
            f"stage 'wan' trains on a latent cache; config.data.source={source!r} is not one. "
            "Build it with the pipeline's VAE and UMT5: `python -m vdm.tools.cache --config "
            "configs/wan_finetune.py --output DIR --config.data.source=folder:CLIPS`, then "
            "train with --config.data.source=cache:DIR."
        )
    return source.split(":", 1)[1]


class WanTask(Task):
    """Flow matching of a pretrained Wan 2.1 DiT on cached Wan latents and UMT5 contexts."""

    def __init__(self, config):
        super().__init__(config)
        self.root = pipeline_root(config)
        self.cache_dir = _cache_dir(config)
        try:
            manifest = cache.read_manifest(self.cache_dir)
            cache.check_compatible(manifest, config, config.data.train_split)
            self.vae = wan_finetune.vae_module(self.root)
            self.latent_stats = wan_finetune.latent_stats(self.vae)
            cfg = wan_finetune.transformer_config(self.root)
        except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
            raise ConfigError(f"stage 'wan': {e}") from None
        m = config.model
        self.module = WanTransformer(
            cfg,
            attention_kernel=m.attention_kernel,
            sequence_parallel=m.sequence_parallel,
            remat=m.remat,
            dtype=jnp.dtype(m.dtype),
            param_dtype=jnp.dtype(m.param_dtype),
        )
        self.module.check()
        self.latent_shape = tuple(manifest["latent_shape"])
        self.context_shape = (int(config.text_encoder.max_length), cfg.text_dim)

    @property
    def tokens_per_example(self) -> int:
        t, h, w, _ = self.latent_shape
        pt, ph, pw = self.module.config.patch_size
        return (t // pt) * (h // ph) * (w // pw)

    @property
    def pretrained_source(self) -> str:
        return self.root

    def dummy_batch(self, batch_size):
        z = np.zeros((batch_size, *self.latent_shape), np.float16)
        ctx = np.zeros((batch_size, *self.context_shape), np.float16)
        mask = np.ones((batch_size, self.context_shape[0]), np.int32)
        return {"latent_mean": z, "context": ctx, "context_mask": mask}

    def device_batch(self, batch):
        return {k: np.asarray(batch[k]) for k in ("latent_mean", "context", "context_mask")}

    def init(self, key, batch):
        b = batch["latent_mean"].shape[0]
        x = jnp.zeros((b, *self.latent_shape), jnp.float32)
        ctx = jnp.zeros((b, *self.context_shape), jnp.float32)
        return self.module.init(key, x, jnp.zeros((b,), jnp.float32), ctx)["params"]

    def pretrained(self, abstract_params):
        """The pipeline's transformer weights, read one tensor at a time onto their shardings."""
        shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
        where = transformer_dir(self.root)
        try:
            return fill_params(files.weights(where, None), self.module, where, shardings)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.pretrained={self.root!r}: {e}") from None

    def frozen(self):
        """The VAE's latent statistics and the empty prompt's context (zeros past its tokens)."""
        ctx, mask = cache.load_null_context(self.cache_dir)
        null = wan_text.zero_past_prompt(jnp.asarray(ctx, jnp.float32), jnp.asarray(mask))
        return {
            "shift": jnp.asarray(self.latent_stats["shift"]),
            "scale": jnp.asarray(self.latent_stats["scale"]),
            "null_ctx": null[None],
        }

    def loss(self, params, frozen, batch, key):
        frozen = jax.lax.stop_gradient(frozen)
        mu = batch["latent_mean"].astype(jnp.float32)
        z0 = (mu - frozen["shift"]) * (1.0 / frozen["scale"])  # WanPipeline's normalisation
        ctx = batch["context"].astype(jnp.float32)
        ctx = wan_text.zero_past_prompt(ctx, batch["context_mask"])
        n_train = int(self.config.diffusion.num_train_timesteps)
        model = wan_pipeline.model_fn(self.module, params, n_train, integer_times=False)
        per_example = losses.diffusion_loss(
            model, z0, (ctx,), key, self.config.diffusion, null_cond=(frozen["null_ctx"],)
        )
        return per_example.mean(), {"latent_std": z0.std()}

    def metadata(self, params, frozen):
        return {
            "wan": {"pretrained": self.root},
            "latent_stats": {k: [float(x) for x in v] for k, v in self.latent_stats.items()},
            "latent_shape": list(self.latent_shape),
        }
