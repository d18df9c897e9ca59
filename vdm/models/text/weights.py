"""Reading Hugging Face safetensors checkpoints and laying PyTorch tensors out as flax params.

PyTorch `nn.Linear` stores its weight as `(out, in)`; flax `Dense` kernels are `(in, out)`, and our
attention projections split the heads axis out (`[embed, heads, kv]`, `[heads, kv, embed]`).
Tensors are read one at a time, only when asked for, so a full T5 checkpoint's decoder or a full
CLIP checkpoint's vision tower is never read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

Dtype = Any


class Weights:
    """Lazy, read-only access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: str, dtype: Dtype, stem: str = "model"):
        """Opens `{stem}.safetensors` or the shards named by `{stem}.safetensors.index.json`.

        Args:
          model_dir: directory holding the checkpoint.
          dtype: every tensor returned by `get` is cast to this (the params' dtype).
          stem: the file name before `.safetensors`: "model" (transformers) or
            "diffusion_pytorch_model" (diffusers).
        """
        index = os.path.join(model_dir, f"{stem}.safetensors.index.json")
        single = os.path.join(model_dir, f"{stem}.safetensors")
        if os.path.exists(single):
            files = [single]
        elif os.path.exists(index):
            with open(index) as f:
                shard_names = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(model_dir, name) for name in shard_names]
        else:
            present = sorted(os.listdir(model_dir))
            raise FileNotFoundError(
                f"No {stem}.safetensors (or {stem}.safetensors.index.json) in '{model_dir}' "
                f"(it holds: {present}). vdm reads safetensors weights only; convert a "
                "PyTorch .bin checkpoint by loading it with its library and calling "
                "`save_pretrained(dir)` (needs torch)."
            )
        missing = [path for path in files if not os.path.exists(path)]
        if missing:
            raise FileNotFoundError(
                f"'{index}' names shards that are not there: {missing[:4]}. The download is "
                "incomplete; fetch the missing files again."
            )
        self.dtype = dtype
        self._where: dict[str, Any] = {}  # tensor name -> (file, open numpy-framework handle)
        for path in files:
            handle = safe_open(path, framework="numpy")
            self._where.update(dict.fromkeys(handle.keys(), (path, handle)))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name`, read from the file header (no data read)."""
        return tuple(self._where[name][1].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a numpy array of `self.dtype`; KeyError names near misses."""
        if name not in self._where:
            stem = name.rsplit(".", 2)[0]
            near = [k for k in self._where if k.startswith(stem)][:8]
            raise KeyError(
                f"Checkpoint has no tensor {name!r} (tensors starting with {stem!r}: {near}); "
                "it does not match the architecture its config.json describes."
            )
        path, handle = self._where[name]
        if handle.get_slice(name).get_dtype() == "BF16":
            # numpy has no bfloat16: read through the flax framework (one tensor at a time) and
            # bring it back to the host as an ml_dtypes bfloat16 array.
            with safe_open(path, framework="flax") as f:
                array = np.asarray(jax.device_get(f.get_tensor(name)))
        else:
            array = handle.get_tensor(name)
        return np.asarray(array, dtype=self.dtype)


def first_present(weights: Weights, *names: str) -> str:
    """The first of `names` present in the checkpoint (checkpoints differ in prefixes)."""
    for name in names:
        if name in weights:
            return name
    raise KeyError(
        f"Checkpoint has none of {list(names)}; first tensors: {weights.keys()[:8]}. Is this the "
        "model family its config.json says?"
    )


def linear(weights: Weights, prefix: str, bias: bool = True) -> dict:
    """`nn.Dense` params from a torch Linear at `prefix` (`{prefix}.weight` is `(out, in)`)."""
    params = {"kernel": weights.get(f"{prefix}.weight").T}
    if bias:
        params["bias"] = weights.get(f"{prefix}.bias")
    return params


def heads_in(weights: Weights, prefix: str, num_heads: int, bias: bool = True) -> dict:
    """Query/key/value projection: torch `(H*Dh, D)` -> kernel `[D, H, Dh]`, bias `[H, Dh]`."""
    w = weights.get(f"{prefix}.weight")
    params = {"kernel": w.T.reshape(w.shape[1], num_heads, -1)}
    if bias:
        params["bias"] = weights.get(f"{prefix}.bias").reshape(num_heads, -1)
    return params


def heads_out(weights: Weights, prefix: str, num_heads: int, bias: bool = True) -> dict:
    """Attention output projection: torch `(D, H*Dh)` -> kernel `[H, Dh, D]`, bias `[D]`."""
    w = weights.get(f"{prefix}.weight")
    params = {"kernel": w.T.reshape(num_heads, -1, w.shape[0])}
    if bias:
        params["bias"] = weights.get(f"{prefix}.bias")
    return params


def attention(weights: Weights, names: dict[str, str], num_heads: int, bias: bool = True) -> dict:
    """Params of `layers.Attention` from torch names: {"query": ..., "key", "value", "out"}."""
    params = {k: heads_in(weights, names[k], num_heads, bias) for k in ("query", "key", "value")}
    params["out"] = heads_out(weights, names["out"], num_heads, bias)
    return params


def norm(weights: Weights, prefix: str, bias: bool = True) -> dict:
    """LayerNorm (`scale`, `bias`) or RMSNorm (`scale`) params from torch `weight`/`bias`."""
    params = {"scale": weights.get(f"{prefix}.weight")}
    if bias:
        params["bias"] = weights.get(f"{prefix}.bias")
    return params


def embedding(weights: Weights, name: str) -> dict:
    """`nn.Embed` params from a torch Embedding weight `[num, features]`."""
    return {"embedding": weights.get(name)}
