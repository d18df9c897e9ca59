"""Wan's prompt encoding: UMT5 hidden states, zero past each prompt's last token.

Wan's DiT attends over all `max_length` (512) text positions with no mask; what makes padding
inert is that the encoder's output there is replaced by zeros (diffusers'
`WanPipeline._get_t5_prompt_embeds`). Prompts are cleaned first as Wan does (HTML entities
unescaped twice, whitespace collapsed). diffusers also runs `ftfy.fix_text` when ftfy is
installed; vdm does not depend on ftfy, so a prompt with mojibake (e.g. "cafÃ©") may tokenize
differently than under a diffusers install that has it. Plain text is unaffected.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vdm.models.text import encoder as te

MAX_LENGTH = 512  # Wan's max_sequence_length


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning (without ftfy): unescape HTML twice, collapse whitespace, strip."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_text_encoder(root: str, max_length: int = MAX_LENGTH, dtype=jnp.float32, **kwargs):
    """The UMT5 encoder and tokenizer of a Diffusers-format Wan pipeline directory `root`
    (text_encoder/ + tokenizer/); kwargs go to `vdm.models.text.encoder.load_text_encoder`."""
    return te.load_text_encoder(root, max_length=max_length, dtype=dtype, **kwargs)


def encode_prompts(encoder: te.TextEncoder, prompts: Sequence[str]) -> jax.Array:
    """`[B, max_length, D]` prompt embeddings as Wan's DiT takes them: the encoder's hidden
    states on each prompt's tokens (its "</s>" included) and zeros after them."""
    return encode_prompts_and_mask(encoder, prompts)[0]


def encode_prompts_and_mask(
    encoder: te.TextEncoder, prompts: Sequence[str]
) -> tuple[jax.Array, jax.Array]:
    """`encode_prompts` and the token mask `[B, max_length]` (1 on each prompt's tokens; Wan's
    DiT takes no mask, vdm's pipeline carries it along)."""
    hidden, mask = encoder([prompt_clean(str(p)) for p in prompts])
    return zero_past_prompt(hidden, mask), mask


def zero_past_prompt(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """The hidden states `[B, L, D]` with zeros where `mask` `[B, L]` is 0 (Wan's padding)."""
    return jnp.where(mask[..., None] > 0, hidden, jnp.zeros((), hidden.dtype))
