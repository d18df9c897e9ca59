"""Named PRNG streams: every random draw in vdm is `fold_in` of the run's base key by a stream name,
the step, and (for sampling) the prompt and sample index. Nothing draws from a default seed."""

import zlib

import jax


def stream(key: jax.Array, name: str) -> jax.Array:
    """The sub-key of `key` for the named stream, e.g. stream(key, "noise"); stable across runs."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def base_key(seed: int) -> jax.Array:
    """The run's base key from the config seed (a new-style typed key)."""
    return jax.random.key(seed)
