"""Text -> video: load the parts, encode prompts, sample latents, decode frames, write files.

    pipe = vdm.load_pipeline()                 # the bundled default model
    videos = pipe(["a 3 moving up"], seed=0)   # uint8 [P * num_samples, T, H, W, 3]

Reproducibility: the initial noise of sample i of prompt p is drawn from
`fold_in(fold_in(key(seed), p), i)` and the sampler is deterministic (a sampler with eta > 0
folds the same per-example key into its step noise). Every per-example computation runs at one
fixed shape, batch 1: each distinct prompt is encoded on its own, and every video is sampled and
decoded by the same batch-1 program, one video per device per call (`jax.shard_map` over the
`data` axis of a mesh of the pipeline's devices; only the last call is padded, up to the device
count). So a video's bits depend only on (seed, p, i, prompt, settings): not on the other
prompts, `num_samples`, `batch_size` or the number of devices (XLA may pick other kernels, which
round differently, for other shapes; tests/test_reproducibility.py). Another CPU model, XLA
version or platform may still round differently.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from vdm import config as config_lib
from vdm import encoders, parallel, rng
from vdm.diffusion import samplers, schedules
from vdm.errors import UserError
from vdm.inference import vae_swap
from vdm.inference.settings import SamplingSettings
from vdm.io import bundle, checkpoint, programs
from vdm.models import autoencoder as ae
from vdm.models import denoiser as dn
from vdm.models import lora
from vdm.models.text import encoder as te
from vdm.models.text import hub

DEFAULT_MODEL = bundle.DEFAULT_MODEL

# Fixed prompts for in-training previews: every digit and direction, numerals and words.
PREVIEW_PROMPTS = (
    "the digit 0 moving to the right",
    "a handwritten one moving down",
    "the number 2 moving to the left",
    "3 moving up",
    "a handwritten four drifting up and to the right",
    "the digit 5 moving down and to the left",
    "six moving to the right",
    "the digit 7 moving up and to the left",
    "an 8 moving down and to the right",
    "the digit 9 moving to the left",
)


def _example_key_data(p_idx: jax.Array, i_idx: jax.Array, *, seed: int) -> tuple[jax.Array, ...]:
    """The raw key data of each example's noise key and sampler-noise key (`rng.example_keys` of
    the seed and of its "sampler" stream, the latter used only when eta > 0)."""
    eta_key = rng.stream(jax.random.key(seed), "sampler")
    keys = (rng.example_keys(seed, p_idx, i_idx), rng.example_keys(eta_key, p_idx, i_idx))
    return tuple(jax.random.key_data(k) for k in keys)


# One program, kept between runs like the sampling one, instead of a dozen op-by-op dispatches
# and a vmap trace per call; the keys are the same bits either way (integer hashing).
_EXAMPLE_KEYS = programs.Cached(jax.jit(_example_key_data, static_argnames="seed"), "keys", "")


@dataclasses.dataclass
class Pipeline:
    """All inference parts of a trained text-to-video model. Call it with prompts."""

    config: Any
    text: te.TextEncoder
    vae: ae.VideoAutoencoder
    vae_params: Any
    latent_stats: dict
    model: dn.Denoiser
    params: Any
    # Devices the videos are split over (the mesh's `data` axis); default: all local devices.
    devices: Sequence[jax.Device] | None = None

    def __post_init__(self):
        self.latent_shape = self._latent_shape()
        self._shift = jnp.asarray(self.latent_stats["shift"], jnp.float32)
        self._scale = jnp.asarray(self.latent_stats["scale"], jnp.float32)
        devices = list(jax.local_devices() if self.devices is None else self.devices)
        self.mesh = parallel.make_mesh({"data": len(devices)}, devices)
        self.num_devices = len(devices)
        self._replicated = parallel.replicated(self.mesh)
        self._null_cache: dict[str, tuple] = {}
        self._placed = None  # (the weights as given, the same weights on the mesh)
        # Traced once per model and kept between runs where the mains enable it (vdm.io.programs):
        # the key holds all the programs close over besides their arguments.
        static = ("sampler", "num_steps", "spec", "time_grid")
        sample_fn = jax.jit(self._sharded, static_argnames=static)
        self._program = programs.Cached(sample_fn, "sample", self._closure_key())
        self._encode = programs.Cached(jax.jit(self.text.encode), "text", repr(self.text.module))

    def _closure_key(self) -> str:
        """What the sampling program closes over: the config, modules, latent statistics and
        mesh (vdm.io.programs adds the arguments, the code and the environment)."""
        config = self.config.to_dict() if hasattr(self.config, "to_dict") else self.config
        parts = [type(self).__name__, config, repr(self.model), repr(self.vae), self.latent_shape]
        parts.append(repr(self.mesh))
        parts += [repr(np.asarray(self._shift)), repr(np.asarray(self._scale))]
        return json.dumps(parts, sort_keys=True, default=repr)

    def _latent_shape(self) -> tuple[int, ...]:
        """(t, h, w, c) of the config's video size (a model family with another VAE overrides
        it)."""
        d = self.config.data
        return tuple(ae.latent_shape(self.config.vae, d.num_frames, d.height, d.width))

    def resize(self, num_frames=None, height=None, width=None) -> Pipeline:
        """This pipeline making videos of another size (None keeps the config's). vdm's own
        models are trained at one size, `config.data`'s; a model family that can change it
        (Wan) overrides this.

        Raises:
          UserError: a size other than the model's.
        """
        d = self.config.data
        asked = {"num_frames": num_frames, "height": height, "width": width}
        bad = [
            f"--{k} {v} (the model's: {d[k]})" for k, v in asked.items() if v not in (None, d[k])
        ]
        if bad:
            raise UserError(
                f"This model makes videos of {d.num_frames} frames of {d.height}x{d.width} only "
                f"(its config.data; it was trained at that size): {', '.join(bad)}. Leave out "
                "--num_frames / --height / --width, or sample a Wan model."
            )
        return self

    # -- sampling --------------------------------------------------------------------------------
    def generate(self, params, vae_params, ctx, mask, null_ctx, null_mask, noise, guidance, eta,
                 key, *, sampler, num_steps, spec=None, time_grid="uniform",
                 uint8=True):  # fmt: skip
        """The whole sampling program, pure and jit-able (what `__call__` runs and `vdm.tools.aot`
        compiles): `num_steps` guided denoiser calls from `noise`, then the streaming VAE decode.

        Args:
          params, vae_params: the denoiser's and the VAE's params.
          ctx, mask: [B, L, D] prompt context and [B, L] its mask; null_ctx, null_mask: the same
            for the negative (or empty) prompt.
          noise: [B, *latent_shape] starting noise; guidance, eta: float32 scalars; key: per-example
            keys [B] (used by stochastic samplers).
          sampler, num_steps, spec, time_grid: static sampler settings (`spec`: the sampling
            DiffusionSpec; `time_grid`: `schedules.TIME_GRIDS`).
          uint8: False returns the decoded floats instead (what the parity tests compare).

        Returns:
          uint8 videos [B, T, H, W, 3] (uint8=False: float32 in [-1, 1]).
        """
        z = self.denoise(
            params,
            ctx,
            mask,
            null_ctx,
            null_mask,
            noise,
            guidance,
            eta,
            key,
            sampler=sampler,
            num_steps=num_steps,
            spec=spec,
            time_grid=time_grid,
        )
        video = self.decode(vae_params, z)
        return ae.to_uint8(video) if uint8 else video

    def denoise(self, params, ctx, mask, null_ctx, null_mask, noise, guidance, eta, key, *,
                sampler, num_steps, spec=None, time_grid="uniform"):  # fmt: skip
        """`generate` without the decode: the denoised latents [B, *latent_shape] in the
        decoder's units (normalized latents * scale + shift). Same arguments as `generate`."""
        z = samplers.sample(
            self.model_fn(params, time_grid),
            noise,
            (ctx, mask),
            (null_ctx, null_mask),
            sampler=sampler,
            num_steps=num_steps,
            guidance=guidance,
            diffusion_config=spec or self.sampling_spec(),
            eta=eta,
            key=key,
            time_grid=time_grid,
            x0_guide=self.x0_guide(ctx, mask),
        )
        return z * self._scale + self._shift

    def x0_guide(self, ctx, mask):
        """The sampler's `x0_guide` for prompts (ctx, mask): None here; alignment guidance
        (`vdm.inference.guidance.GuidedPipeline`) overrides it."""
        return None

    def model_fn(self, params, time_grid: str = "uniform"):
        """`model_fn(x, t, (ctx, mask)) -> raw output` of the denoiser with `params` (what the
        sampler calls on `time_grid`; a model family with another denoiser overrides it)."""
        del time_grid  # vdm's denoisers take the time as the sampler gives it
        return dn.model_fn(self.model, params)

    def decode(self, vae_params, z):
        """Un-normalised latents [B, t, h, w, c] -> video in [-1, 1] [B, T, H, W, 3] (streaming
        decode; a model family with another VAE overrides it)."""
        return ae.decode(self.vae, vae_params, z, chunk=self.config.vae.decode_chunk)

    @property
    def settings(self) -> SamplingSettings:
        """The model's default sampling settings (`config.sample`)."""
        return SamplingSettings.from_config(self.config.sample)

    def sampling_spec(self, shift: float | None = None) -> schedules.DiffusionSpec:
        """The DiffusionSpec the sampler uses: `config.diffusion` with the sampling time shift
        `shift`, else `config.sample.shift`, else the training one.

        Raises:
          UserError: a shift this model cannot sample with (e.g. not > 0, or not a flow model).
        """
        if shift is None:
            shift = self.config.sample.get("shift")
        try:
            return schedules.sampling_spec(self.config.diffusion, shift)
        except ValueError as e:
            raise UserError(str(e)) from None

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (hidden [B, L, D], mask [B, L]) numpy; warns when a prompt is truncated.

        Each distinct prompt is encoded once, on its own, at batch 1 (and the fixed token length
        L), so its encoding never depends on the other prompts: XLA may round differently at
        another batch shape.
        """
        distinct = list(dict.fromkeys(prompts))
        encoded = [self.encode_one(p) for p in distinct]
        rows = [distinct.index(p) for p in prompts]
        hidden = np.concatenate([np.asarray(h) for h, _ in encoded])
        return hidden[rows], np.concatenate([np.asarray(m) for _, m in encoded])[rows]

    def encode_one(self, prompt: str):
        """(hidden [1, L, D], mask [1, L]) of one prompt (a model family that encodes prompts
        otherwise overrides it)."""
        return self._encode_text([prompt])

    def _null(self, negative_prompt: str):
        """The encoding of the negative (or empty) prompt, [1, L, D] and [1, L], cached."""
        if negative_prompt not in self._null_cache:
            self._null_cache[negative_prompt] = self.encode_one(negative_prompt)
        return self._null_cache[negative_prompt]

    def _encode_text(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """`self.text(prompts)` through the kept text program: (hidden [B, L, D], mask [B, L])."""
        ids, mask = self.text.tokenize(prompts)
        return self._encode(self.text.params, ids, mask), jnp.asarray(mask)

    def _placed_weights(self):
        """(params, vae_params) replicated on the mesh; placed again only when they change."""
        given = self._placed[0] if self._placed else (None, None)
        if given[0] is not self.params or given[1] is not self.vae_params:
            current = (self.params, self.vae_params)
            self._placed = (current, jax.device_put(current, self._replicated))
        return self._placed[1]

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        num_samples: int = 1,
        settings: SamplingSettings | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> np.ndarray:
        """Generates `num_samples` videos per prompt.

        Every video is computed by the same batch-1 program (one per device at a time, the batch
        split over the mesh's `data` axis), so its bits depend only on (seed, prompt index,
        sample index, prompt, settings): not on the other prompts, `num_samples`, `batch_size`
        or the device count (module docstring).

        Args:
          prompts: captions; the empty string is the unconditional prompt.
          seed: base seed; sample i of prompt p uses fold_in(fold_in(key(seed), p), i).
          num_samples: videos per prompt.
          settings: sampler, steps, guidance, eta, negative prompt, shift (default:
            `self.settings`, the model's `config.sample`).
          batch_size: videos dispatched before they are fetched (rounded up to a multiple of the
            device count; does not change the result).
          progress: show a tqdm bar over batches.

        Returns:
          uint8 array [len(prompts) * num_samples, T, H, W, 3], prompt-major.
        """
        call = dict(seed=seed, num_samples=num_samples, settings=settings, batch_size=batch_size)
        return np.concatenate([v for _, v in self.iter_videos(prompts, progress=progress, **call)])

    def iter_videos(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        num_samples: int = 1,
        settings: SamplingSettings | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
        """`__call__` batch by batch, so a caller can write videos as they are made: yields
        ([(prompt index, sample index)], uint8 videos [n, T, H, W, 3]) in prompt-major order.
        Only one batch of videos is held at a time. Arguments and results as `__call__`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UserError("No prompt given: pass at least one prompt.")
        settings = self.settings if settings is None else settings
        spec = self.sampling_spec(settings.shift)
        cond = self.encode_prompts(prompts)
        null = self._null(settings.negative_prompt)
        weights = self._placed_weights()
        pairs = itertools.product(range(len(prompts)), range(num_samples))  # never a full list
        step = -(-batch_size // self.num_devices) * self.num_devices
        batches = range(0, len(prompts) * num_samples, step)
        if progress:
            from tqdm import tqdm

            desc = f"sampling ({settings.sampler}, {settings.num_steps} steps)"
            batches = tqdm(batches, desc=desc, unit="batch")
        for _ in batches:
            chunk = list(itertools.islice(pairs, step))
            n = self.num_devices
            # Dispatch every call of the chunk before fetching any (they run asynchronously).
            calls = [
                self._sample_batch(chunk[k : k + n], seed, weights, cond, null, settings, spec)
                for k in range(0, len(chunk), n)
            ]
            yield chunk, np.concatenate([np.asarray(v) for v in calls])[: len(chunk)]

    def _sample_batch(self, pairs, seed, weights, cond, null, settings, spec):
        """Videos for up to `num_devices` (prompt index, sample index) `pairs`, one per device:
        one call of the compiled program, padded (repeating the last pair) to the device count."""
        pairs = pairs + [pairs[-1]] * (self.num_devices - len(pairs))
        p_idx = np.array([p for p, _ in pairs], np.int32)
        i_idx = np.array([i for _, i in pairs], np.int32)
        ctx, mask = cond
        return self._program(
            *weights,
            ctx[p_idx],
            mask[p_idx],
            *null,
            *_EXAMPLE_KEYS(p_idx, i_idx, seed=seed),
            jnp.float32(settings.guidance),
            jnp.float32(settings.eta),
            sampler=settings.sampler,
            num_steps=settings.num_steps,
            spec=spec,
            time_grid=settings.time_grid,
        )

    def _per_device(self, params, vae_params, ctx, mask, null_ctx, null_mask, noise_keys,
                    eta_keys, guidance, eta, *, sampler, num_steps, spec, time_grid):  # fmt: skip
        """One device's share of `_program`: its video (batch 1) from its keys."""
        noise_key, eta_key = (jax.random.wrap_key_data(k) for k in (noise_keys, eta_keys))
        noise = jax.vmap(lambda k: jax.random.normal(k, self.latent_shape, jnp.float32))(noise_key)
        return self.generate(
            params, vae_params, ctx, mask, null_ctx, null_mask, noise, guidance, eta, eta_key,
            sampler=sampler, num_steps=num_steps, spec=spec, time_grid=time_grid,
        )  # fmt: skip

    def _sharded(self, *args, sampler, num_steps, spec, time_grid):
        """`_per_device` on every device of the mesh, the batch split over `data` (jitted as
        `self._program`)."""
        batch, rep = P("data"), P()
        fn = jax.shard_map(
            functools.partial(
                self._per_device,
                sampler=sampler,
                num_steps=num_steps,
                spec=spec,
                time_grid=time_grid,
            ),
            mesh=self.mesh,
            in_specs=(rep, rep, batch, batch, rep, rep, batch, batch, rep, rep),
            out_specs=batch,
        )
        return fn(*args)


# -- loading ---------------------------------------------------------------------------------------
def load_pipeline(
    path: str | None = None,
    *,
    item: str = "ema",
    vae: str | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Pipeline:
    """Loads a pipeline from an exported model dir (default: the bundled model) or a denoiser
    training workdir / checkpoint step dir.

    Args:
      path: the model (default: the bundled one).
      item: "ema" or "params" weights of a training checkpoint.
      vae: another VAE checkpoint to decode with (see `vae_swap.swap_vae`), e.g. a decoder
        fine-tune.
      devices: the devices to sample on, one video per device at a time (default: all local
        devices); the videos are the same whichever and however many.

    Raises:
      UserError: the path does not exist or holds no model; `vae` encodes differently.
    """
    path = path or DEFAULT_MODEL
    if not os.path.exists(path):
        hint = (
            " This install has no bundled default model (vdm/assets/default_model); train one "
            "with configs/vae_quickstart.py and configs/quickstart.py (README: Training) and "
            "pass --checkpoint WORKDIR."
            if path == DEFAULT_MODEL
            else " Pass a denoiser workdir, a checkpoint step dir or an exported model dir."
        )
        raise UserError(f"Checkpoint '{path}' does not exist.{hint}")
    if bundle.is_bundle(path):
        b = bundle.read(path)
        config, text_encoder = ConfigDict(b.config), b.text_encoder
        params, vae_params, stats = b.params, b.vae_params, b.latent_stats
    else:
        # `vae` is None afterwards when it stood in for an unusable recorded VAE (nothing to swap).
        config, meta, params, vae_params, vae = _load_checkpoint(path, item, vae)
        text_encoder = meta.get("text_encoder", config.text_encoder.name)
        stats = meta["latent_stats"]
    config_lib.upgrade(config)
    with hub.recorded(f"the model '{path}' (its text encoder name)"):
        text = te.load_text_encoder(
            text_encoder,
            max_length=config.text_encoder.max_length,
            dtype=jnp.dtype(config.text_encoder.dtype),
        )
    pipe = Pipeline(
        config=config,
        text=text,
        vae=ae.VideoAutoencoder.from_config(config.vae),
        vae_params=vae_params,
        latent_stats=stats,
        model=dn.Denoiser.from_config(config.model, config.vae.latent_channels),
        params=params,
        devices=devices,
    )
    return vae_swap.swap_vae(pipe, vae) if vae else pipe


def _load_checkpoint(path: str, item: str, vae: str | None = None):
    """(config, metadata, denoiser params, VAE params, `vae` still to swap in) of a denoiser
    training checkpoint (one step: a workdir's newest readable one); its recorded VAE is checked
    before it is read, and `vae` replaces it when it is unusable."""
    try:
        config, meta, params = checkpoint.load_checkpoint(path, item=item)
    except FileNotFoundError as e:
        raise UserError(f"No vdm checkpoint found at '{path}': {e}") from None
    if config.stage != "denoiser":
        raise UserError(
            f"'{path}' is a checkpoint of stage '{config.stage}', not a denoiser; sample.py "
            "needs a denoiser checkpoint (its VAE is found through the checkpoint metadata)."
        )
    if int(config.optim.get("lora_rank", 0) or 0) > 0:
        params = _merge_lora(config, meta, params, path)
    vae_path = checkpoint.recorded_vae(meta, path, override=vae)
    if vae_path:
        vae_params = checkpoint.load_params(vae_path, item="ema")
    else:
        logging.warning("Denoiser checkpoint has no VAE reference: using a random VAE.")
        _, vae_params, _ = encoders.load_vae(config)
    return config, meta, params, vae_params, None if vae_path == vae else vae


def _merge_lora(config, meta, adapters, path: str):
    """A LoRA run's checkpoint holds adapters: the base it references, merged with them."""
    base = meta.get("lora", {}).get("base") or config.train.init_from
    try:
        params = checkpoint.load_params(base, item="ema")
    except FileNotFoundError as e:
        raise UserError(
            f"'{path}' holds LoRA adapters for the base model '{base}', which cannot be read "
            f"({e}). Put the base back there."
        ) from None
    try:
        return lora.merge(params, adapters, config.optim)
    except ValueError as e:
        raise UserError(f"'{path}': the LoRA adapters do not fit the base '{base}': {e}") from None
