"""The architecture of a Wan 2.1 text-to-video DiT, read from diffusers' `transformer/config.json`.

`WanTransformerConfig.from_diffusers(dict)` takes the config of a `WanTransformer3DModel`
(diffusers 0.42.1) and refuses what vdm does not implement (image-to-video parts, other model
classes, unknown keys) with a ConfigError that names the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from vdm.errors import ConfigError

# config.json keys of WanTransformer3DModel and what vdm does with them.
_SUPPORTED = {
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "rope_max_seq_len",
}
_IMAGE_TO_VIDEO = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


@dataclasses.dataclass(frozen=True)
class WanTransformerConfig:
    """The architecture of a WanTransformer3DModel (its `transformer/config.json`).

    Defaults are diffusers' defaults (the 14B model: 40 heads of 128, 40 layers).
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) latent patch per token.
    num_heads: int = 40
    head_dim: int = 128  # D = num_heads * head_dim.
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096  # width of the T5 hidden states.
    freq_dim: int = 256  # width of the timestep sinusoid.
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True  # affine LayerNorm before cross-attention (else none).
    eps: float = 1e-6  # every LayerNorm and the q/k RMSNorms.
    rope_max_seq_len: int = 1024  # positions per axis diffusers tabulates (a limit on t', h', w').
    rope_theta: float = 10000.0  # fixed in diffusers (WanRotaryPosEmbed's default).

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def patch_dim(self) -> int:
        return math.prod(self.patch_size) * self.in_channels

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> WanTransformerConfig:
        """The config of a diffusers `WanTransformer3DModel` config.json dict.

        Raises:
          ConfigError: another model class, unknown keys, or parts vdm does not implement
            (image-to-video: image_dim / added_kv_proj_dim / pos_embed_seq_len).
        """
        name = config.get("_class_name", "WanTransformer3DModel")
        if name != "WanTransformer3DModel":
            raise ConfigError(
                f"transformer/config.json describes a {name!r}; vdm.models.wan reads "
                "WanTransformer3DModel (Wan 2.1 text-to-video) only."
            )
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _SUPPORTED)
        unknown = [k for k in unknown if k not in _IMAGE_TO_VIDEO]
        if unknown:
            raise ConfigError(
                f"transformer/config.json has keys {unknown} that WanTransformer3DModel of "
                "diffusers 0.42.1 does not have; this is another model version, which vdm does "
                "not implement."
            )
        i2v = {k: config[k] for k in _IMAGE_TO_VIDEO if config.get(k) is not None}
        if i2v:
            raise ConfigError(
                f"transformer/config.json sets {i2v}: an image-to-video Wan model (image "
                "embedder, added key/value projections). vdm implements Wan 2.1 text-to-video "
                "only; use a T2V checkpoint such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers."
            )
        qk_norm = config.get("qk_norm", "rms_norm_across_heads")
        if qk_norm != "rms_norm_across_heads":
            raise ConfigError(
                f"transformer/config.json has qk_norm={qk_norm!r}; vdm implements "
                "'rms_norm_across_heads' (what every published Wan 2.1 model uses)."
            )
        defaults = cls()
        get = config.get
        made = cls(
            patch_size=tuple(int(p) for p in get("patch_size", defaults.patch_size)),
            num_heads=int(get("num_attention_heads", defaults.num_heads)),
            head_dim=int(get("attention_head_dim", defaults.head_dim)),
            in_channels=int(get("in_channels", defaults.in_channels)),
            # diffusers: `out_channels or in_channels`.
            out_channels=int(get("out_channels") or get("in_channels", defaults.in_channels)),
            text_dim=int(get("text_dim", defaults.text_dim)),
            freq_dim=int(get("freq_dim", defaults.freq_dim)),
            ffn_dim=int(get("ffn_dim", defaults.ffn_dim)),
            num_layers=int(get("num_layers", defaults.num_layers)),
            cross_attn_norm=bool(get("cross_attn_norm", defaults.cross_attn_norm)),
            eps=float(get("eps", defaults.eps)),
            rope_max_seq_len=int(get("rope_max_seq_len", defaults.rope_max_seq_len)),
        )
        made.check()
        return made

    def check(self) -> None:
        """Raises ConfigError for sizes the model cannot be built with."""
        problems = []
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            problems.append(f"patch_size={self.patch_size} must be 3 positive ints")
        if self.head_dim % 2 or self.head_dim < 6:
            problems.append(
                f"attention_head_dim={self.head_dim} must be even and >= 6 (3-D RoPE splits it "
                "into even parts for t, h, w)"
            )
        if self.freq_dim % 2:
            problems.append(f"freq_dim={self.freq_dim} must be even")
        sizes = ("num_heads", "in_channels", "out_channels", "text_dim", "ffn_dim", "num_layers")
        problems += [f"{k}={getattr(self, k)} must be >= 1" for k in sizes if getattr(self, k) < 1]
        if problems:
            raise ConfigError("Invalid Wan transformer config: " + "; ".join(problems) + ".")
