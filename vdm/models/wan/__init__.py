"""Wan 2.1 (Alibaba, Apache-2.0) as a vdm model family: its DiT and causal 3-D VAE as linen
modules that load the published Diffusers-format files (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`
layout) without torch. `files` finds and reads those files; the modules live beside it."""
