"""Loading a Diffusers-format `transformer/` (WanTransformer3DModel) into `WanTransformer` params.

`load_transformer(path, dtype)` reads `config.json` and the safetensors (single file or shards,
float32 or bfloat16) one tensor at a time, lays each out for flax (`weight_plan`), checks its
shape, casts it to the param's dtype and puts it on the device, or straight onto a mesh with the
`NamedSharding` its logical axis names give, so no host ever holds all weights at once. Every
param must be filled and every checkpoint tensor used; errors name the tensor.

`to_diffusers(params, module, like)` is the way back (a fine-tuned model exported in the same
files, `vdm.tools.export`): each layout function only moves and reshapes values, so its inverse
is read off by applying it to the indices of the checkpoint tensor's shape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm.models.wan import files
from vdm.models.wan.transformer import WanTransformer
from vdm.models.wan.transformer_config import WanTransformerConfig
from vdm.parallel import mesh as mesh_lib

Dtype = Any
Path = tuple[str, ...]
Plan = dict[Path, tuple[str, Callable[[np.ndarray], np.ndarray]]]
# Tensors diffusers itself skips when loading (`_keys_to_ignore_on_load_unexpected`).
IGNORED = ("norm_added_q",)


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def weight_plan(cfg: WanTransformerConfig) -> Plan:
    """flax param path -> (checkpoint tensor name, torch -> flax layout function)."""
    nh, hd, dim = cfg.num_heads, cfg.head_dim, cfg.dim
    plan: Plan = {}

    def linear(path: Path, name: str, kernel=_transpose, bias=_same) -> None:
        plan[(*path, "kernel")] = (f"{name}.weight", kernel)
        plan[(*path, "bias")] = (f"{name}.bias", bias)

    def heads(x: np.ndarray) -> np.ndarray:  # [H*K] -> [H, K]
        return x.reshape(nh, hd)

    # Conv3d weight [D, C, pt, ph, pw] -> [pt*ph*pw*C, D], the order of `patches.patchify`.
    linear(
        ("patch_embedding",),
        "patch_embedding",
        lambda w: w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0]),
    )
    cond = "condition_embedder"
    linear(("time_embedder_1",), f"{cond}.time_embedder.linear_1")
    linear(("time_embedder_2",), f"{cond}.time_embedder.linear_2")
    linear(("time_proj",), f"{cond}.time_proj")
    linear(("text_embedder_1",), f"{cond}.text_embedder.linear_1")
    linear(("text_embedder_2",), f"{cond}.text_embedder.linear_2")
    for i in range(cfg.num_layers):
        src, dst = f"blocks.{i}", (f"blocks_{i}",)
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):  # [H*K, D] -> [D, H, K]
                linear(
                    (*dst, attn, proj),
                    f"{src}.{attn}.{proj}",
                    lambda w: w.T.reshape(-1, nh, hd),
                    heads,
                )
            linear(
                (*dst, attn, "to_out"), f"{src}.{attn}.to_out.0", lambda w: w.T.reshape(nh, hd, -1)
            )
            for norm in ("norm_q", "norm_k"):
                plan[(*dst, attn, norm, "scale")] = (f"{src}.{attn}.{norm}.weight", heads)
        if cfg.cross_attn_norm:
            plan[(*dst, "norm2", "scale")] = (f"{src}.norm2.weight", _same)
            plan[(*dst, "norm2", "bias")] = (f"{src}.norm2.bias", _same)
        linear((*dst, "ffn_proj"), f"{src}.ffn.net.0.proj")
        linear((*dst, "ffn_out"), f"{src}.ffn.net.2")
        plan[(*dst, "scale_shift_table")] = (
            f"{src}.scale_shift_table",
            lambda x: x.reshape(6, dim),
        )
    linear(("proj_out",), "proj_out")
    plan[("scale_shift_table",)] = ("scale_shift_table", lambda x: x.reshape(2, dim))
    return plan


def abstract_params(module: WanTransformer) -> Any:
    """The module's params as boxed `ShapeDtypeStruct`s (shapes, dtypes, logical names)."""
    cfg = module.config
    x = jax.ShapeDtypeStruct((1, *cfg.patch_size, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 1, cfg.text_dim), jnp.float32)
    # Abstract evaluation only: the key never draws numbers.
    return jax.eval_shape(module.init, jax.random.key(0), x, t, ctx)["params"]


def transformer_dir(path: str) -> str:
    """The `transformer/` directory of a pipeline (directory or hub id), or `path` itself if it
    is a component directory (config.json, no model_index.json)."""
    local = os.path.expanduser(path)
    own = os.path.isdir(local) and os.path.exists(os.path.join(local, "config.json"))
    if own and not os.path.exists(os.path.join(local, "model_index.json")):
        return local
    return files.component_dir(files.pipeline_dir(path), "transformer")


def _flat(tree: Any) -> dict[Path, Any]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def _read(weights, name: str, layout, want, where: str) -> np.ndarray:
    """Tensor `name` in flax layout and `want`'s dtype; ValueError if it is absent or misfits."""
    try:
        tensor = weights.get(name)
    except KeyError as e:
        raise ValueError(f"Weights of '{where}': {e.args[0]}") from None
    try:
        array = layout(tensor)
    except ValueError:
        array = None
    if array is None or tuple(array.shape) != tuple(want.shape):
        raise ValueError(
            f"Weights of '{where}': tensor {name!r} has shape {tuple(tensor.shape)}, which does "
            f"not fit the param of shape {tuple(want.shape)} that its config.json describes."
        )
    return np.asarray(array, dtype=want.dtype)


def fill_params(weights, module: WanTransformer, where: str, shardings: Any = None) -> dict:
    """Every param of `module` from `weights` (a `Weights`), one tensor at a time.

    Args:
      weights: the checkpoint (`vdm.models.wan.files.weights`).
      module: the module whose param tree is filled.
      where: the checkpoint's path, for messages.
      shardings: a tree like the params of `NamedSharding`s, or None (the default device).

    Returns:
      The params (nested dicts of jax Arrays).
    """
    wanted = _flat(mesh_lib.unbox(abstract_params(module)))
    plan = weight_plan(module.config)
    if set(plan) != set(wanted):  # a bug in the plan, not in the checkpoint
        raise AssertionError(
            f"weight plan and module differ: {sorted(set(plan) ^ set(wanted))[:6]}"
        )
    places = _flat(shardings) if shardings is not None else {}
    params: dict = {}
    for path, want in wanted.items():
        name, layout = plan[path]
        array = _read(weights, name, layout, want, where)
        value = jax.device_put(array, places[path]) if places else jnp.asarray(array)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    used = {name for name, _ in plan.values()}
    names = weights.keys()
    unused = [k for k in names if k not in used and not any(i in k for i in IGNORED)]
    if unused:
        raise ValueError(
            f"Weights of '{where}' hold {len(unused)} tensors the model its config.json "
            f"describes has no place for: {sorted(unused)[:8]}. The checkpoint is not a Wan 2.1 "
            "text-to-video transformer of that config."
        )
    return params


def load_transformer(
    path: str,
    dtype: Dtype = jnp.float32,
    *,
    param_dtype: Dtype | None = None,
    mesh: jax.sharding.Mesh | None = None,
    logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
    attention_kernel: str = "auto",
    sequence_parallel: str = "ulysses",
    remat: str = "none",
) -> tuple[WanTransformer, dict]:
    """A Wan 2.1 text-to-video transformer and its params from Diffusers-format files.

    Args:
      path: a pipeline directory or hub id (its `transformer/` is read), or the `transformer/`
        directory itself.
      dtype: compute dtype.
      param_dtype: storage dtype of the params (None = `dtype`); time_embedder, the
        scale_shift_tables and norm2 stay float32 (as diffusers keeps them).
      mesh: if given, each param is placed straight onto it, sharded by `logical_axis_rules`.
      logical_axis_rules: logical -> mesh axis rules (config.mesh.logical_axis_rules).
      attention_kernel, sequence_parallel, remat: `WanTransformer` options.

    Returns:
      `(module, params)`; `module.apply({"params": params}, x, timestep, context)`.

    Raises:
      FileNotFoundError: no such pipeline / transformer directory or weights.
      ConfigError: a config vdm does not implement (image-to-video, other model classes).
      ValueError: weights that do not fit the config (the message names the tensor).
    """
    model_dir = transformer_dir(path)
    config = WanTransformerConfig.from_diffusers(files.read_config(model_dir))
    module = WanTransformer(
        config,
        attention_kernel=attention_kernel,
        sequence_parallel=sequence_parallel,
        remat=remat,
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(dtype if param_dtype is None else param_dtype),
    )
    module.check()
    shardings = None
    if mesh is not None:
        if logical_axis_rules is None:
            raise ValueError("load_transformer(mesh=...) also needs logical_axis_rules.")
        shardings = mesh_lib.logical_to_sharding(abstract_params(module), mesh, logical_axis_rules)
    weights = files.weights(model_dir, None)  # each tensor cast to its own param's dtype
    return module, fill_params(weights, module, model_dir, shardings)


def logical_axes(module: WanTransformer) -> Any:
    """Pytree like the params of `PartitionSpec`s of logical axis names."""
    return nn.get_partition_spec(abstract_params(module))


def _invert(layout, torch_shape: tuple[int, ...], array: np.ndarray) -> np.ndarray:
    """The tensor of `torch_shape` that `layout` maps to `array` (layouts permute and reshape)."""
    index = np.asarray(layout(np.arange(int(np.prod(torch_shape))).reshape(torch_shape)))
    if index.shape != array.shape:
        raise ValueError(f"a param of shape {array.shape} for a tensor of shape {torch_shape}")
    out = np.empty(index.size, array.dtype)
    out[index.ravel()] = array.ravel()
    return out.reshape(torch_shape)


def to_diffusers(params: dict, module: WanTransformer, like) -> dict[str, np.ndarray]:
    """The checkpoint tensors (diffusers names and layouts) of `params`, the inverse of
    `fill_params`.

    Args:
      params: the module's params (host or device arrays).
      module: the module.
      like: the `Weights` of a checkpoint of the same config (tensor shapes; tensors diffusers
        ignores on loading, e.g. `norm_added_q`, are copied from it).

    Returns:
      {tensor name: float32 numpy array}.
    """
    flat = _flat(params)
    out: dict[str, np.ndarray] = {}
    for path, (name, layout) in weight_plan(module.config).items():
        if name not in like:
            raise ValueError(f"The reference checkpoint has no tensor {name!r}.")
        shape = like.shape(name)
        array = np.asarray(jax.device_get(flat[path]), np.float32)
        try:
            out[name] = _invert(layout, tuple(shape), array)
        except ValueError as e:
            raise ValueError(f"Param {'/'.join(path)} -> tensor {name!r}: {e}") from None
    names = like.keys()  # a Weights is not iterable
    for name in names:
        if name not in out and any(i in name for i in IGNORED):
            out[name] = np.asarray(like.get(name), np.float32)
    return out
