"""Loading a Diffusers-format Wan 2.1 VAE: `vae/` (config.json + the safetensors weights).

The flax param tree mirrors diffusers' module names, so each param's torch name is a rule:
"/"-joined path with `name_<i>` -> `name.<i>` (`encoder/down_blocks_3/conv1/kernel` ->
`encoder.down_blocks.3.conv1.weight`); conv weights `(out, in, *k)` become kernels `(*k, in, out)`,
RMS-norm gammas `(C, 1, 1[, 1])` become `(C,)`. Every param must be found and every tensor used.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdm.errors import ConfigError
from vdm.models.text.weights import Weights
from vdm.models.wan import files
from vdm.models.wan.vae import WanVAE, init_shapes

Dtype = Any
PyTree = Any

# diffusers' AutoencoderKLWan defaults (0.42.1), used for fields a config.json leaves out.
DEFAULTS: dict[str, Any] = dict(
    base_dim=96,
    decoder_base_dim=None,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
    is_residual=False,
    in_channels=3,
    out_channels=3,
    patch_size=None,
    scale_factor_temporal=4,
    scale_factor_spatial=8,
)  # fmt: skip
_WAN21 = "vdm loads the Wan 2.1 VAE (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae)"


def _unsupported(c: dict[str, Any]) -> list[str]:
    """What in config `c` the Wan 2.1 modules cannot represent (empty if all is well)."""
    problems = []
    if c["is_residual"]:
        problems.append("is_residual=true (the Wan 2.2 VAE's residual down/up blocks)")
    if c["patch_size"] is not None:
        problems.append(f"patch_size={c['patch_size']} (the Wan 2.2 VAE's patchify)")
    if list(c["attn_scales"]):
        problems.append(f"attn_scales={c['attn_scales']} (attention inside levels)")
    n_levels = len(c["dim_mult"])
    down = list(c["temperal_downsample"])
    if n_levels < 2 or len(down) < n_levels - 1 or sum(map(bool, down[: n_levels - 1])) != 2:
        problems.append(
            f"dim_mult={c['dim_mult']} with temperal_downsample={down}: diffusers encodes in "
            "chunks of 4 frames, so exactly two of the first len(dim_mult) - 1 transitions "
            "must halve time"
        )
    if c["scale_factor_temporal"] not in (None, 4):
        problems.append(f"scale_factor_temporal={c['scale_factor_temporal']} (must be 4)")
    fs = 2 ** (n_levels - 1)
    if c["scale_factor_spatial"] not in (None, fs):
        problems.append(f"scale_factor_spatial={c['scale_factor_spatial']} (the levels give {fs})")
    for key in ("latents_mean", "latents_std"):
        if c[key] is not None and len(c[key]) != c["z_dim"]:
            problems.append(f"{key} has {len(c[key])} values for z_dim={c['z_dim']}")
    return problems


def module_from_config(
    config: dict[str, Any], dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None
) -> WanVAE:
    """The WanVAE of a diffusers `AutoencoderKLWan` config dict (missing fields: defaults).

    Raises:
      ConfigError: another class, unknown fields, or fields vdm does not support (Wan 2.2).
    """
    where = config.get("_name_or_path", "the VAE config")
    name = config.get("_class_name", "AutoencoderKLWan")
    if name != "AutoencoderKLWan":
        raise ConfigError(f"{where}: _class_name={name!r}, not AutoencoderKLWan; {_WAN21}.")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ConfigError(
            f"{where} has fields vdm's Wan VAE does not know: {unknown} (a newer or different "
            f"VAE); {_WAN21}. Known fields: {sorted(DEFAULTS)}."
        )
    c = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    problems = _unsupported(c)
    if problems:
        raise ConfigError(f"{where} is not supported: " + "; ".join(problems) + f". {_WAN21}.")
    dtype = jnp.dtype(dtype)
    return WanVAE(
        base_dim=int(c["base_dim"]),
        decoder_base_dim=int(c["decoder_base_dim"] or c["base_dim"]),
        z_dim=int(c["z_dim"]),
        dim_mult=tuple(int(m) for m in c["dim_mult"]),
        num_res_blocks=int(c["num_res_blocks"]),
        temperal_downsample=tuple(bool(d) for d in c["temperal_downsample"]),
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        latents_mean=tuple(float(m) for m in c["latents_mean"] or ()),
        latents_std=tuple(float(s) for s in c["latents_std"] or ()),
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else jnp.dtype(param_dtype),
    )


def torch_name(path: tuple[str, ...]) -> str:
    """The diffusers state-dict name of the flax param at `path` (keys from the root)."""
    modules = [re.sub(r"_(\d+)$", r".\1", key) for key in path[:-1]]
    leaf = {"kernel": "weight"}.get(path[-1], path[-1])
    return ".".join([*modules, leaf])


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":  # torch (out, in, *k) -> (*k, in, out)
        return array.transpose(*range(2, array.ndim), 1, 0)
    if leaf == "gamma":  # (C, 1, 1[, 1]) -> (C,)
        return array.reshape(-1)
    return array


def convert(weights: Weights, expected: PyTree) -> PyTree:
    """Params shaped like `expected` from the tensors of `weights`; every tensor must be used.

    Raises:
      ValueError: naming missing tensors, tensors of the wrong shape, or unexpected tensors.
    """
    used, missing, wrong = set(), [], []

    def one(path, leaf):
        keys = tuple(p.key for p in path)
        name = torch_name(keys)
        if name not in weights:
            missing.append(name)
            return None
        used.add(name)
        array = _to_flax(weights.get(name), keys[-1])
        if array.shape != tuple(leaf.shape):
            wrong.append(f"{name} {array.shape} (converted) != {tuple(leaf.shape)}")
        return array

    params = jax.tree_util.tree_map_with_path(one, expected)
    unexpected = sorted(set(weights.keys()) - used)
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    if wrong:
        problems.append(f"tensors of the wrong shape {wrong[:8]}")
    if unexpected:
        more = " ..." if len(unexpected) > 8 else ""
        problems.append(
            f"tensors the config's architecture has no place for {unexpected[:8]}{more}"
        )
    if problems:
        raise ValueError(
            "The VAE weights do not match its config.json: " + "; ".join(problems) + ". The "
            "safetensors file and config.json must come from the same Wan 2.1 VAE."
        )
    return params


def load_vae(
    vae_dir: str, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None
) -> tuple[WanVAE, PyTree]:
    """The Wan 2.1 VAE module and its params from a Diffusers-format `vae/` directory.

    Args:
      vae_dir: the `vae/` directory (config.json + diffusion_pytorch_model.safetensors), or a
        pipeline directory that holds one.
      dtype: compute dtype (e.g. "bfloat16").
      param_dtype: dtype the params are stored in; None = `dtype`.

    Returns:
      (module, params): use with `vae.encode(module, params, video)` / `vae.decode(...)`.

    Raises:
      FileNotFoundError: no config or weights; ConfigError: an unsupported config;
      ValueError: weights that do not fit the config.
    """
    if os.path.exists(os.path.join(vae_dir, "model_index.json")):
        vae_dir = files.component_dir(vae_dir, "vae")
    config = files.read_config(vae_dir)
    config.setdefault("_name_or_path", os.path.join(vae_dir, "config.json"))
    module = module_from_config(config, dtype, param_dtype)
    weights = files.weights(vae_dir, module.param_dtype)
    try:
        params = convert(weights, init_shapes(module))
    except ValueError as e:
        raise ValueError(f"'{vae_dir}': {e}") from None
    return module, jax.tree.map(jnp.asarray, params)
