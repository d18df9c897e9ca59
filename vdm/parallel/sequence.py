"""Sequence parallelism: attention over a sequence split across the `sequence` mesh axis.

With `config.mesh.shape["sequence"] = n > 1` the denoiser's token activations are split over
their frames dim (logical name "frames" -> mesh axis "sequence"), so every per-token layer (MLP,
adaLN, norms, projections) works on 1/n of the tokens with no communication. Attention is the one
place where a token needs the others; `over_frames` runs it inside `jax.shard_map`, manual over
the `sequence` axis only (data, fsdp and tensor stay automatic, so it composes with them):

* spatial attention (within a frame) and cross-attention to the text (short: its keys and values
  are replicated over `sequence`, only the queries are split) need no communication;
* temporal and joint ("full") attention attend over a sequence that spans the frames, so they use
  `model.sequence_parallel`:
  - "ulysses" (DeepSpeed-Ulysses): an all-to-all trades the sequence split for a head split, each
    device attends over the whole sequence for `heads / n` heads, and a second all-to-all trades
    back. Needs the head count divisible by n; two all-to-alls of q, k, v, o per attention.
  - "ring" (ring attention): each device keeps its queries and passes its key / value block
    around the ring (`jax.lax.ppermute`), accumulating a blockwise online softmax (running max
    and log-sum-exp), so no device ever holds more than one key block's logits. Works for any
    head count; n - 1 neighbour exchanges of k and v.

Both equal the dense attention up to float rounding (tests/test_sequence_parallel.py). With the
axis of size 1 (the default) or outside a mesh, `over_frames` calls the local function directly.

`attend(q, k, v, mask)` is the per-device attention kernel on `[B, S, H, D]` blocks with a key
mask `[B, S_k]` (True = a real key) or None; the denoiser passes `vdm.models.attention.attention`
with its `model.attention_kernel`, and `dense_attend` (`jax.nn.dot_product_attention`) is the
default here. Ring attention computes its blocks itself (it needs their log-sum-exp). All of them
give a zero output for a query row whose keys are all masked (padding never leaks).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vdm.errors import ConfigError

AXIS = "sequence"
METHODS = ("ulysses", "ring")
# Logit of a masked key: finite, so a row whose keys are all masked stays finite (no NaN) until it
# is zeroed.
_MASKED = float(jnp.finfo(jnp.float32).min)

Attend = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


def dense_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Dense attention `[B, Sq, H, D] x [B, Sk, H, D] -> [B, Sq, H, D]`, key mask `[B, Sk]`."""
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v)
    mask = mask.astype(bool)
    y = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
    return y * mask.any(axis=-1)[:, None, None, None].astype(y.dtype)


def ulysses_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    attend: Attend = dense_attend,
    axis_name: str = AXIS,
) -> jax.Array:
    """Ulysses attention on sequence shards (call inside `shard_map` over `axis_name`).

    Args:
      q, k, v: this device's `[B, S / n, H, D]` block of the sequence (n = size of `axis_name`).
      mask: this device's `[B, S / n]` block of the key mask (True = a real key), or None.
      attend: the per-device attention `attend(q, k, v, mask)` on `[B, S, H / n, D]`.
      axis_name: the mesh axis the sequence is split over.

    Returns:
      This device's `[B, S / n, H, D]` block of the attention output.

    Raises:
      ConfigError: the head count does not divide over the axis.
    """
    n = jax.lax.axis_size(axis_name)
    heads = q.shape[2]
    if heads % n:
        raise ConfigError(
            f"Ulysses sequence parallelism splits the {heads} attention heads over the "
            f"'{axis_name}' mesh axis of size {n}, which does not divide them; use "
            f"--config.model.sequence_parallel=ring (any head count), or a '{axis_name}' size "
            f"that divides {heads} (config.mesh.shape), or a multiple of {n} heads."
        )
    to_heads = functools.partial(
        jax.lax.all_to_all, axis_name=axis_name, split_axis=2, concat_axis=1, tiled=True
    )
    full_mask = None
    if mask is not None:
        full_mask = jax.lax.all_gather(mask, axis_name, axis=1, tiled=True)
    y = attend(to_heads(q), to_heads(k), to_heads(v), full_mask)
    return jax.lax.all_to_all(y, axis_name, split_axis=1, concat_axis=2, tiled=True)


def _ring_block(carry, q, k, v, mask):
    """One key block of the online softmax: carry (o, m, l) of output, row max and row sum."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        s = jnp.where(mask.astype(bool)[:, None, None, :], s, _MASKED)
    s_max = s.max(axis=-1)
    if carry is None:
        m_new = jax.lax.stop_gradient(s_max)
    else:
        o, m, l_sum = carry
        m_new = jax.lax.stop_gradient(jnp.maximum(m, s_max))
    p = jnp.exp(s - m_new[..., None])
    pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if carry is None:
        return pv, m_new, p.sum(axis=-1)
    correction = jnp.exp(m - m_new)  # [B, H, Sq]
    o = o * correction.transpose(0, 2, 1)[..., None] + pv
    return o, m_new, l_sum * correction + p.sum(axis=-1)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    axis_name: str = AXIS,
    return_lse: bool = False,
):
    """Ring attention on sequence shards (call inside `shard_map` over `axis_name`).

    Each of the n devices keeps its queries; the key / value blocks (and their mask) travel
    around the ring with `jax.lax.ppermute`, n - 1 hops. Every block's logits are computed here
    in float32 and folded into a running softmax (row max `m`, row sum `l`, output `o`), so the
    result is the dense attention over the whole sequence. The running max is a constant of the
    math (the softmax does not depend on it), so it carries no gradient; each hop is
    rematerialised in the backward pass, which keeps one block's logits alive at a time.

    Args:
      q, k, v: this device's `[B, S / n, H, D]` block of the sequence.
      mask: this device's `[B, S / n]` block of the key mask (True = a real key), or None.
      axis_name: the mesh axis the sequence is split over.
      return_lse: also return the log-sum-exp of every query row `[B, H, S / n]` (float32).

    Returns:
      This device's `[B, S / n, H, D]` block of the output (q's dtype; zero for a row with no
      real key), and the log-sum-exp if asked for.
    """
    n = jax.lax.axis_size(axis_name)
    qs = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    ring = [(j, (j + 1) % n) for j in range(n)]
    carry = _ring_block(None, qs, k, v, mask)

    @jax.checkpoint
    def hop(state, _):
        carry, kv = state
        kv = jax.lax.ppermute(kv, axis_name, ring)
        return (_ring_block(carry, qs, *kv), kv), None

    if n > 1:
        (carry, _), _ = jax.lax.scan(hop, (carry, (k, v, mask)), length=n - 1)
    o, m, l_sum = carry
    out = o / l_sum.transpose(0, 2, 1)[..., None]
    if mask is not None:  # zero the rows with no real key anywhere on the ring
        any_valid = jax.lax.psum(mask.astype(bool).any(axis=-1).astype(jnp.int32), axis_name) > 0
        out = out * any_valid[:, None, None, None]
    out = out.astype(q.dtype)
    return (out, m + jnp.log(l_sum)) if return_lse else out


# ---------------------------------------------------------------------------------------------
# The denoiser's entry point
# ---------------------------------------------------------------------------------------------
def axis_size(axis_name: str = AXIS) -> int:
    """Size of `axis_name` in the mesh of the current trace (1 outside a mesh or without it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis_name not in mesh.axis_names:
        return 1
    return int(mesh.shape[axis_name])


def _replicated_context(k: jax.Array, v: jax.Array, spec: P, platform: str):
    """(k, v, inside): the keys / values to pass to the sequence split with `spec` (P() for a
    replicated text context), and what the shard_map body applies to get them back.

    The gradient of an input replicated over the manual axis is a `psum` of its cotangent over
    that axis. In bfloat16 on the XLA CPU compiler (jax 0.10.2) a psum inside a shard_map that
    is manual over some mesh axes only aborts the process: its reduction computation is lowered
    with a sharding annotation at the root, which becomes a `copy`, and the CPU pipeline's
    AllReducePromotion pass (bfloat16 all-reduce -> float32) rebuilds the reducer from the root
    opcode: `F hlo_instruction.cc:1615] Invalid binary instruction opcode copy`. Minimal repro:
    `jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "s"), mesh=mesh, in_specs=P(None, "s"),
    out_specs=P(), axis_names={"s"}))` on a bfloat16 array with a ("d", "s") mesh of 2 x 4 CPU
    devices (fine in float32 / float16, or manual over every axis). So on CPU a bfloat16
    context enters the shard_map in float32 and is cast back inside: the forward values are
    the same (bfloat16 -> float32 -> bfloat16 is exact), the cotangent is summed in float32
    (then rounded to bfloat16 once). Float32 (and other platforms) pass through unchanged.
    """
    if spec != P() or platform != "cpu" or k.dtype != jnp.bfloat16:
        return k, v, lambda x: x
    dtype = k.dtype
    return k.astype(jnp.float32), v.astype(jnp.float32), lambda x: x.astype(dtype)


def sequence_attend(method: str, attend: Attend = dense_attend, axis_name: str = AXIS) -> Attend:
    """`attend(q, k, v, mask)` over a sequence split across `axis_name`, by `method`."""
    if method == "ulysses":
        return lambda q, k, v, mask: ulysses_attention(
            q, k, v, mask=mask, attend=attend, axis_name=axis_name
        )
    if method == "ring":
        return lambda q, k, v, mask: ring_attention(q, k, v, mask=mask, axis_name=axis_name)
    raise ConfigError(
        f"model.sequence_parallel={method!r} is not one of {METHODS} (all-to-all over heads, or "
        "ring attention)."
    )


def over_frames(
    fn: Callable,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    method: str,
    spans_frames: bool,
    attend: Attend = dense_attend,
    axis_name: str = AXIS,
    platform: str | None = None,
) -> jax.Array:
    """Runs the attention `fn(q, k, v, mask, attend)` with q split over its frames dim.

    Args:
      fn: the local attention on 6-D `q [B, t, h, w, H, K]` (regroup, `attend`, ungroup).
      q: queries `[B, t, h, w, H, K]`.
      k, v: keys / values: 6-D like q (self-attention: split like q) or `[B, L, H, K]` (a text
        context: replicated over the axis).
      mask: key mask of a text context `[B, L]` (replicated), or None.
      method: "ulysses" | "ring", for attention whose sequence spans the frames.
      spans_frames: whether each attended sequence spans the frames (temporal / joint): then
        `fn` gets the sequence-parallel attend; else (spatial, cross) the local one.
      attend: the per-device attention kernel.
      axis_name: the mesh axis of the frame split.
      platform: the target platform (default `jax.default_backend()`; see `_replicated_context`).

    Returns:
      `fn`'s output `[B, t, h, w, H, K]`, split over frames like q.

    Raises:
      ConfigError: the frame count does not divide over the axis.
    """
    n = axis_size(axis_name)
    if n == 1:
        return fn(q, k, v, mask, attend)
    frames = q.shape[1]
    if frames % n:
        raise ConfigError(
            f"Sequence parallelism splits the denoiser's {frames} token frames (latent frames / "
            f"model.patch_size[0]) over the '{axis_name}' mesh axis of size {n}, which does not "
            f"divide them; set the '{axis_name}' size in config.mesh.shape to a divisor of "
            f"{frames}, or change data.num_frames so that the token frames are a multiple of {n}."
        )
    local = sequence_attend(method, attend, axis_name) if spans_frames else attend
    split = P(None, axis_name)
    kv_spec = split if k.ndim == q.ndim else P()
    k, v, inside = _replicated_context(k, v, kv_spec, platform or jax.default_backend())
    return jax.shard_map(
        lambda q, k, v, mask: fn(q, inside(k), inside(v), mask, local),
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(split, kv_spec, kv_spec, P()),
        out_specs=split,
        axis_names={axis_name},
        # The attend kernel may be a shard_map of its own (splash: Mosaic kernels are not
        # auto-partitioned, check_vma=False); nested in a checked region its cotangents would
        # lose their type. Unchecked, the transposes are still exact (gradients equal 1-device).
        check_vma=False,
    )(q, k, v, mask)
