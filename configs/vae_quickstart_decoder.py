"""Stage 1b of the bundled default model: the quickstart VAE's decoder fine-tuned on whole clips.

  python train.py --config configs/vae_quickstart_decoder.py \
      --workdir workdirs/vae_quickstart_decoder

Why: configs/vae_quickstart.py trains on random 9-frame windows (3 latent frames). The causal
convolutions' temporal receptive field is longer than that, so latent frames 3 and 4 of a 17-frame
clip see a history the VAE never trained on, and decode worse (the figures: docs/experiments.md,
"VAE training windows").

How: start from the trained VAE (`train.init_from`) and train on whole 17-frame clips with the
encoder frozen (`optim.freeze`), as Stable Diffusion fine-tuned its VAE decoder: the encoder, and
so the latents, their statistics and any denoiser trained on them, stay exactly as they were.
"""

from configs import vae_quickstart


def get_config():
    c = vae_quickstart.get_config()
    c.vae.train_frames = 0  # whole 17-frame clips
    c.train.init_from = "workdirs/vae_quickstart"
    c.optim.freeze = "^encoder/"
    c.train.num_steps = 1500
    c.train.eval_every_steps = 250
    c.checkpoint.every_steps = 250
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 50
    return c
