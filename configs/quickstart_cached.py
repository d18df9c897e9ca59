"""The quickstart denoiser trained from precomputed VAE latents and MiniLM embeddings.

  python -m vdm.tools.cache --config configs/quickstart.py --output cache/quickstart --split train
  python -m vdm.tools.cache --config configs/quickstart.py --output cache/quickstart --split test
  python train.py --config configs/quickstart_cached.py --workdir workdirs/quickstart

The step then runs the denoiser alone (the VAE encoder and the text encoder cost as much again on
a CPU). The cache records which VAE checkpoint and text encoder built it; a mismatch with this
config fails at start with the differing fields named.
"""

from configs import quickstart


def get_config():
    c = quickstart.get_config()
    c.data.source = "cache:cache/quickstart"
    return c
