"""Frozen text encoders: Hugging Face weights in our own linen modules.

    enc = load_text_encoder("minilm", max_length=32)    # the offline default (all-MiniLM-L6-v2)
    hidden, mask = enc(["a 7 moving left", ""])          # [2, 32, 384] float32, [2, 32] int32
    ids, mask = enc.tokenize(prompts)                     # numpy int32 [B, L], padded to L always
    hidden = jax.jit(enc.encode)(enc.params, ids, mask)   # pure: params are an explicit argument

`name_or_path` is an alias ("minilm"), a local directory holding `config.json`,
`model.safetensors` (or a sharded index) and tokenizer files (or a diffusers-style folder with
`text_encoder/` and `tokenizer/`), or a Hugging Face hub id (only where the hub is reachable).
The config's `model_type` picks the family from `FAMILIES` (BERT, T5/mT5/UMT5, CLIP text);
configs and tokenizers are read by transformers (`AutoConfig`, `AutoTokenizer`), or with `json`
and the `tokenizers` package where that gives the same (`vdm.models.text.fast`: BERT, so the
default MiniLM loads without importing transformers or torch), weights by safetensors, and the
modules are ours (transformers 5 has no Flax models).

The output is the last hidden state of every token, not pooled: the denoiser cross-attends to
`hidden [B, L, D]` under `mask [B, L]`. Classifier-free guidance's null context is the encoding
of the empty prompt "" (`null_context()`): BERT tokenizes it to `[CLS] [SEP]`, T5 to `</s>`,
CLIP to `<|startoftext|> <|endoftext|>`, so it is a real, learned "no caption" embedding rather
than zeros. Prompts longer than `max_length` tokens are truncated with a warning.

The encoder is frozen: `encode` stops gradients. Params are replicated by default; every param
has logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`), so `shard(mesh, rules)` (or
`load_text_encoder(..., mesh=, logical_axis_rules=)`) spreads a T5-XXL-size encoder over devices.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vdm.io import programs
from vdm.models.text import bert, clip, fast, hub, t5
from vdm.models.text.weights import Weights

Dtype = Any


def import_transformers():
    """Imports `transformers` without its "PyTorch was not found" notice and returns it.

    vdm runs its own Flax encoders and uses transformers only for tokenizers and configs, so a
    torch-free install is the normal case here, not a problem to report on every run. Only that
    import-time advisory is muted (the user's TRANSFORMERS_NO_ADVISORY_WARNINGS, if set, wins).
    """
    if "transformers" not in sys.modules and "TRANSFORMERS_NO_ADVISORY_WARNINGS" not in os.environ:
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
        try:
            import transformers
        finally:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
    import transformers

    return transformers


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build and load one model family (a value of `FAMILIES`)."""

    # (hf_config, dtype=, param_dtype=) -> linen module with a `hidden_size` attribute and
    # `__call__(ids [B, L], mask [B, L]) -> [B, L, hidden_size]`.
    build: Callable[..., nn.Module]
    # (Weights, module) -> params pytree (numpy arrays) matching `module.init`.
    convert: Callable[[Weights, nn.Module], dict]
    description: str


# HF config `model_type` -> family. Add a family here; nothing else dispatches on model type.
FAMILIES: dict[str, Family] = {
    "bert": Family(bert.BertEncoder.from_hf, bert.convert, "BERT, e.g. all-MiniLM-L6-v2"),
    "t5": Family(t5.T5Encoder.from_hf, t5.convert, "T5 v1.0 / v1.1 encoder"),
    "mt5": Family(t5.T5Encoder.from_hf, t5.convert, "mT5 encoder"),
    "umt5": Family(
        functools.partial(t5.T5Encoder.from_hf, per_layer_bias=True),
        t5.convert,
        "UMT5 encoder (per-layer relative position bias)",
    ),
    "clip_text_model": Family(clip.CLIPTextEncoder.from_hf, clip.convert, "CLIP text model"),
    "clip": Family(clip.CLIPTextEncoder.from_hf, clip.convert, "text tower of a full CLIP model"),
}


def get_family(model_type: str) -> Family:
    """The `Family` for an HF config `model_type`; ValueError naming the supported ones."""
    if model_type not in FAMILIES:
        supported = ", ".join(f"{k!r} ({v.description})" for k, v in FAMILIES.items())
        raise ValueError(
            f"Text encoder model_type {model_type!r} is not supported. Supported model types: "
            f"{supported}. To add one, implement a linen module and a weight converter and "
            "register them in vdm.models.text.encoder.FAMILIES."
        )
    return FAMILIES[model_type]


def _param_shapes(module: nn.Module, max_length: int) -> dict[str, list[int]]:
    """{key path: shape} of the params `module.init` makes (abstractly: nothing is computed)."""
    ids = jax.ShapeDtypeStruct((1, max_length), jnp.int32)
    expected = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), ids, ids)["params"])
    leaves = jax.tree_util.tree_leaves_with_path(expected)
    return {jax.tree_util.keystr(k): list(v.shape) for k, v in leaves}


def _check_params(params: dict, want: dict[str, list[int]], source: str) -> None:
    """Raises ValueError if converted params differ from the module's (`want`, from
    `_param_shapes`) in structure or shape."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves}
    want = {k: tuple(v) for k, v in want.items()}
    problems = [f"missing {k}" for k in want.keys() - got.keys()]
    problems += [f"unexpected {k}" for k in got.keys() - want.keys()]
    both = want.keys() & got.keys()
    problems += [f"{k}: shape {got[k]}, expected {want[k]}" for k in both if got[k] != want[k]]
    if problems:
        raise ValueError(
            f"Weights of '{source}' do not fit the module its config describes: "
            + "; ".join(sorted(problems)[:10])
        )


class TextEncoder:
    """A frozen text encoder: tokenizer + linen module + params, with static shapes.

    Attributes:
      module: the linen module, `module.apply({"params": params}, ids, mask) -> [B, L, D]`.
      params: pytree of jnp arrays (plain, unboxed).
      tokenizer: the transformers tokenizer, or a `fast.Tokenizer` with the same interface (None
        for an abstract encoder, which only encodes).
      max_length: L; every batch is padded (or truncated) to exactly L tokens.
      name: where it was loaded from (for messages and checkpoint metadata).
    """

    def __init__(
        self, module: nn.Module, params: Any, tokenizer: Any, max_length: int = 32, name: str = ""
    ):
        _check_max_length(module, max_length, name)
        # No tokenizer: an abstract encoder (vdm.models.text.architectures) that only encodes.
        if tokenizer is not None and tokenizer.pad_token is None:  # the mask hides the pad.
            tokenizer.pad_token = tokenizer.eos_token
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name
        self._encode_jit = jax.jit(self.encode)

    @property
    def dim(self) -> int:
        """D, the width of the hidden states (the denoiser's context dim)."""
        return self.module.hidden_size

    @property
    def dtype(self) -> Dtype:
        """The compute dtype of the hidden states."""
        return self.module.dtype

    @classmethod
    def from_config(
        cls,
        hf_config: Any,
        key: jax.Array,
        tokenizer: Any,
        max_length: int = 32,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype | None = None,
    ) -> TextEncoder:
        """A randomly initialised encoder of the architecture `hf_config` describes.

        Args:
          hf_config: a transformers config (BertConfig, T5Config, UMT5Config, CLIPTextConfig...).
          key: PRNG key of the random init.
          tokenizer: a transformers tokenizer, or a directory to load one from.
          max_length: L.
          dtype: compute dtype.
          param_dtype: params dtype; None = `dtype`.

        Returns:
          The TextEncoder.
        """
        if isinstance(tokenizer, str | os.PathLike):
            import_transformers()
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        module = build_module(hf_config, dtype, param_dtype)
        ids = jnp.zeros((1, max_length), jnp.int32)
        # One compiled init instead of an op-by-op dispatch per param (much faster on CPU).
        params = nn.unbox(jax.jit(module.init)(key, ids, jnp.ones_like(ids))["params"])
        name = f"random {hf_config.model_type}"
        return cls(module, params, tokenizer, max_length, name=name)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask, padded to `max_length`; warns for each truncated prompt.

        Args:
          prompts: list (or numpy array) of B strings; "" gives the null prompt.

        Returns:
          `(ids, mask)`, numpy int32 `[B, max_length]`; mask is 1 on tokens, 0 on padding.
        """
        if isinstance(prompts, str | bytes):
            raise TypeError(f"tokenize takes a list of prompts, got the string {prompts!r}.")
        prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in prompts]
        full = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        for prompt, ids in zip(prompts, full, strict=True):
            if len(ids) > self.max_length:
                shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
                warnings.warn(
                    f"Prompt {shown!r} has {len(ids)} tokens (with special tokens), more than the "
                    f"text encoder's max_length={self.max_length}; it is truncated to "
                    f"{self.max_length} tokens.",
                    stacklevel=2,
                )
        enc = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def encode(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Hidden states of every token (pure and jit-able; gradients stop: the encoder is frozen).

        Args:
          params: the encoder params (`self.params`, possibly sharded).
          ids: int32 `[B, L]` token ids.
          mask: int32/bool `[B, L]`, 1 on tokens.

        Returns:
          `[B, L, D]` in the module's dtype.
        """
        hidden = self.module.apply({"params": params}, ids, mask)
        return jax.lax.stop_gradient(hidden)

    def __call__(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Tokenizes and encodes: returns `(hidden [B, L, D], mask int32 [B, L])`."""
        ids, mask = self.tokenize(prompts)
        return self._encode_jit(self.params, ids, mask), jnp.asarray(mask)

    def null_context(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
        """The unconditional context for guidance: the encoding of the empty prompt ""."""
        return self([""] * batch_size)

    def logical_axes(self) -> Any:
        """Pytree like `params` of `PartitionSpec`s of logical axis names (e.g. embed, heads)."""
        ids = jax.ShapeDtypeStruct((1, self.max_length), jnp.int32)
        # Abstract evaluation only: the key is never used to draw numbers.
        boxed = jax.eval_shape(self.module.init, jax.random.key(0), ids, ids)
        return nn.get_partition_spec(boxed)["params"]

    def shard(self, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> TextEncoder:
        """A copy whose params are placed on `mesh` by logical axis `rules`.

        Args:
          mesh: the device mesh.
          rules: logical -> mesh axis rules, e.g. `config.mesh.logical_axis_rules`.

        Returns:
          A new TextEncoder sharing module and tokenizer.
        """
        shardings = nn.logical_to_mesh_sharding(self.logical_axes(), mesh, list(rules))
        params = jax.device_put(self.params, shardings)
        return TextEncoder(self.module, params, self.tokenizer, self.max_length, self.name)


def _check_max_length(module: nn.Module, max_length: int, name: str) -> None:
    limit = getattr(module, "max_positions", None)
    if max_length < 1 or (limit is not None and max_length > limit):
        raise ValueError(
            f"Text encoder max_length={max_length} is invalid for '{name}': it must be between 1 "
            f"and {limit or 'any length'} (the size of its position table)."
        )


def build_module(hf_config: Any, dtype: Dtype, param_dtype: Dtype | None) -> nn.Module:
    """The linen module of the architecture a transformers config describes."""
    dtype = jnp.dtype(dtype)
    param_dtype = dtype if param_dtype is None else jnp.dtype(param_dtype)
    return get_family(hf_config.model_type).build(hf_config, dtype=dtype, param_dtype=param_dtype)


def _read_config(model_dir: str, dtype: Dtype, param_dtype: Dtype | None) -> tuple[Any, nn.Module]:
    """(config, module) of `model_dir`: from config.json alone where that is the same
    (`fast.read_config`), else through transformers' AutoConfig."""
    config = fast.read_config(model_dir)
    if config is not None:
        try:
            module = build_module(config, dtype, param_dtype)
        except AttributeError:
            if not config.missing:
                raise
        if not config.missing:
            return config, module
    import_transformers()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config, build_module(config, dtype, param_dtype)


def load_tokenizer(tokenizer_dir: str) -> Any:
    """The tokenizer of `tokenizer_dir`: through `tokenizers` alone where that encodes the same
    (`fast.load_tokenizer`), else transformers' AutoTokenizer."""
    tokenizer = fast.load_tokenizer(tokenizer_dir)
    if tokenizer is None:
        import_transformers()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer


def load_text_encoder(
    name_or_path: str = "minilm",
    max_length: int = 32,
    dtype: Dtype = jnp.float32,
    *,
    param_dtype: Dtype | None = None,
    mesh: jax.sharding.Mesh | None = None,
    logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
) -> TextEncoder:
    """Loads a pretrained text encoder (config, tokenizer and safetensors weights).

    Args:
      name_or_path: "minilm" (offline default), a local directory or a hub id.
      max_length: L, the static token length of every batch.
      dtype: compute dtype (jnp dtype or name such as "bfloat16").
      param_dtype: dtype the weights are stored in; None = `dtype`.
      mesh: if given with `logical_axis_rules`, params are placed sharded on it straight from
        host memory (never gathered on one device).
      logical_axis_rules: logical -> mesh axis rules (config.mesh.logical_axis_rules).

    Returns:
      The TextEncoder.

    Raises:
      FileNotFoundError: the model cannot be found (path missing, no weights, hub unreachable).
      ValueError: unsupported model_type, weights that do not fit the config, bad max_length.
    """
    model_dir, tokenizer_dir = hub.resolve_model_dir(name_or_path)
    hf_config, module = _read_config(model_dir, dtype, param_dtype)
    _check_max_length(module, max_length, name_or_path)  # before reading any weights.
    weights = Weights(model_dir, module.param_dtype)
    try:
        params = get_family(hf_config.model_type).convert(weights, module)
    except KeyError as e:
        raise ValueError(f"Weights of '{model_dir}': {e.args[0]}") from None
    # Tracing the init for its shapes costs more than the rest of the load: kept between runs
    # like the traced programs (vdm.io.programs), under the module's every field.
    shapes = functools.partial(_param_shapes, module, max_length)
    key = f"{module!r} {max_length}"
    _check_params(params, programs.remembered("text-params", key, shapes), model_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    if mesh is not None:
        if logical_axis_rules is None:
            raise ValueError("load_text_encoder(mesh=...) also needs logical_axis_rules.")
        enc = TextEncoder(module, params, tokenizer, max_length, name_or_path)
        return enc.shard(mesh, logical_axis_rules)
    params = jax.tree.map(jnp.asarray, params)
    return TextEncoder(module, params, tokenizer, max_length, name_or_path)


def _tiny_hf_config(family: str, dim: int, num_layers: int, num_heads: int, vocab_size: int):
    """A small transformers config of `family` (random-weight encoders for tests)."""
    import_transformers()
    from transformers import BertConfig, CLIPTextConfig, T5Config, UMT5Config

    mlp = 4 * dim
    builders = {
        "bert": lambda: BertConfig(
            vocab_size=vocab_size,
            hidden_size=dim,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=mlp,
            max_position_embeddings=512,
        ),
        "t5": lambda: T5Config(
            vocab_size=vocab_size,
            d_model=dim,
            d_kv=dim // num_heads,
            d_ff=mlp,
            num_layers=num_layers,
            num_heads=num_heads,
            feed_forward_proj="gated-gelu",
        ),
        "umt5": lambda: UMT5Config(
            vocab_size=vocab_size,
            d_model=dim,
            d_kv=dim // num_heads,
            d_ff=mlp,
            num_layers=num_layers,
            num_heads=num_heads,
        ),
        "clip_text_model": lambda: CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=dim,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=mlp,
        ),
    }
    if family not in builders:
        raise ValueError(f"tiny_text_encoder family {family!r}: choose one of {sorted(builders)}.")
    return builders[family]()


@functools.cache
def _minilm_tokenizer():
    """The MiniLM tokenizer, loaded once per process (tests build many tiny encoders)."""
    import_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hub.minilm_path())


def tiny_text_encoder(
    key: jax.Array,
    dim: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_length: int = 32,
    family: str = "bert",
    dtype: Dtype = jnp.float32,
) -> TextEncoder:
    """A small random-weight encoder with the real (offline) MiniLM tokenizer, for tests.

    Args:
      key: PRNG key of the random init.
      dim: D, the hidden width.
      num_layers: transformer blocks.
      num_heads: attention heads (must divide dim).
      max_length: L.
      family: "bert", "t5", "umt5" or "clip_text_model".
      dtype: compute and param dtype.

    Returns:
      The TextEncoder (no files other than the MiniLM tokenizer are read).
    """
    tokenizer = _minilm_tokenizer()
    hf_config = _tiny_hf_config(family, dim, num_layers, num_heads, len(tokenizer))
    return TextEncoder.from_config(hf_config, key, tokenizer, max_length, dtype)
