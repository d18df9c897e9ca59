"""Named PRNG streams: every random draw in vdm is `fold_in` of the run's base key by a stream name,
the step, and (for sampling) the prompt and sample index. Nothing draws from a default seed."""

import zlib

import jax
import jax.numpy as jnp


def stream(key: jax.Array, name: str) -> jax.Array:
    """The sub-key of `key` for the named stream, e.g. stream(key, "noise"); stable across runs."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def base_key(seed: int) -> jax.Array:
    """The run's base key from the config seed (a new-style typed key)."""
    return jax.random.key(seed)


def example_keys(seed, prompt_indices, sample_indices) -> jax.Array:
    """Per-example keys fold_in(fold_in(key(seed), p), i) [B] (typed keys).

    Args:
      seed: int seed (or a typed base key).
      prompt_indices: int [B], the prompt index p of each example.
      sample_indices: int [B], the sample index i of each example.

    Returns:
      typed PRNG keys [B].
    """
    typed = isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)
    base = seed if typed else jax.random.key(seed)
    p = jnp.asarray(prompt_indices, jnp.int32)
    i = jnp.asarray(sample_indices, jnp.int32)
    if p.shape != i.shape or p.ndim != 1:
        raise ValueError(
            f"prompt_indices {p.shape} and sample_indices {i.shape} must be equal-length 1-D."
        )
    return jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(base, a), b))(p, i)
