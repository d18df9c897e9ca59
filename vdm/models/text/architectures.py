"""Text-encoder architectures known without their weights, for abstract (ahead-of-time) builds.

`architecture(name)` gives the transformers config of `config.text_encoder.name` without reading
any weight: from the table below for known hub ids (so a T5-XXL is never downloaded), else from
the `config.json` of an alias or a local directory. `abstract_text_encoder` builds a `TextEncoder`
of that architecture whose params are `jax.ShapeDtypeStruct`s.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.errors import ConfigError
from vdm.models.text import encoder as te
from vdm.models.text import hub

# Architectures of text encoders known by hub id, so AOT needs neither the hub nor the weights.
# Values are transformers config kwargs (model_type picks the family in `encoder.FAMILIES`).
TEXT_ENCODER_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # T5 v1.1 XXL encoder (Imagen, PixArt, CogVideoX, SD3): 4.76B params.
    "google/t5-v1_1-xxl": dict(
        model_type="t5",
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
    ),
    # UMT5-XXL (Wan 2.x): the same shape with a 256k vocabulary and per-layer position bias.
    "google/umt5-xxl": dict(
        model_type="umt5",
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
    ),
}


def architecture(name: str):
    """The transformers config of text encoder `name` without reading any weights.

    Args:
      name: `config.text_encoder.name`: a key of TEXT_ENCODER_ARCHITECTURES, an alias
        ("minilm") or a local directory with a config.json.

    Returns:
      A transformers PretrainedConfig.
    """
    te.import_transformers()
    from transformers import AutoConfig, T5Config, UMT5Config

    if name in TEXT_ENCODER_ARCHITECTURES:
        kwargs = dict(TEXT_ENCODER_ARCHITECTURES[name])
        cls = {"t5": T5Config, "umt5": UMT5Config}[kwargs.pop("model_type")]
        return cls(**kwargs)
    if name in hub.ALIASES or os.path.isdir(os.path.expanduser(name)):
        model_dir, _ = hub.resolve_model_dir(name)
        return AutoConfig.from_pretrained(model_dir)
    raise ConfigError(
        f"config.text_encoder.name={name!r}: an abstract build needs the encoder's architecture "
        f"without downloading it. Known hub ids: {sorted(TEXT_ENCODER_ARCHITECTURES)}; or an "
        f"alias ({sorted(hub.ALIASES)}), or a local directory with config.json (add other hub ids "
        "to vdm.models.text.architectures.TEXT_ENCODER_ARCHITECTURES)."
    )


def abstract_text_encoder(name: str, max_length: int, dtype) -> te.TextEncoder:
    """A `TextEncoder` of `name`'s architecture with abstract params and no tokenizer.

    Its `encode` is the real encoder's (the same program); `tokenize` is unavailable.
    """
    module = te.build_module(architecture(name), jnp.dtype(dtype), None)
    ids = jax.ShapeDtypeStruct((1, max_length), jnp.int32)
    # Abstract evaluation only: the key never draws numbers.
    params = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), ids, ids)["params"])
    return te.TextEncoder(module, params, None, max_length, name)
