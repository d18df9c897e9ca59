"""The bundled model's text-video alignment model (stage "alignment", vdm.models.alignment).

  python -m vdm.tools.cache --config configs/quickstart.py --output cache/quickstart \
      --split train --limit 10000
  python train.py --config configs/alignment.py --workdir workdirs/alignment \
      --config.data.source=cache:cache/quickstart
  python -m vdm.tools.alignment --checkpoint workdirs/alignment --bundle vdm/assets/default_model

A video tower on the bundled VAE's latents and a head on the frozen MiniLM sentence embedding,
trained with symmetric InfoNCE on the moving-digits TRAINING captions only (never the held-out
vocabulary). The bundled one: these settings on the first 10,000 training videos (the cache
above), 600 steps of batch 128, about 15 min on a shared 2-core CPU (1.5 s/step); without a
cache the step also encodes every video and caption (about twice as slow).
"""

from configs import quickstart


def get_config():
    c = quickstart.get_config()  # the bundled model's data, VAE and text encoder
    c.stage = "alignment"
    c.alignment.variant = "S"
    c.alignment.eval_pairs = 300
    c.train.num_steps = 600
    c.train.batch_size = 128
    c.train.eval_every_steps = 300
    c.train.log_every_steps = 50
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.optim.ema_decay = 0.99
    c.checkpoint.every_steps = 300
    return c
