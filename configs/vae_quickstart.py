"""Stage 1 of the bundled default model: the causal video VAE on 17x32x32 moving digits.

  python train.py --config configs/vae_quickstart.py --workdir workdirs/vae_quickstart

Compression 4x4x4 (17 frames -> 5 latent frames, 32x32 -> 8x8) with 8 latent channels. Sized for
a 2-core CPU; on an accelerator raise train.batch_size and set vae.dtype="bfloat16".
"""

from configs import base


def get_config():
    c = base.get_config()
    c.stage = "autoencoder"
    c.vae.variant = "S"
    c.vae.temporal_factor = 4
    c.vae.spatial_factor = 4
    c.vae.latent_channels = 8
    # Random 9-frame windows: half the cost of 17, but latent frames 3-4 of a 17-frame clip then
    # see a causal history never trained on (docs/experiments.md, "VAE training windows").
    # configs/vae_quickstart_decoder.py fixes that with a decoder fine-tune on whole clips;
    # a VAE trained from scratch should use train_frames = 0 (or the clip length) instead.
    c.vae.train_frames = 9
    c.train.num_steps = 3000
    c.train.batch_size = 4  # small enough for a 2-core CPU step (docs/experiments.md)
    c.train.eval_every_steps = 1000
    c.train.log_every_steps = 50
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.checkpoint.every_steps = 500
    return c
