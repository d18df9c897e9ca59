"""~1B-parameter factorized space-time denoiser, 480p x 81 frames, T5-XXL text encoder (TPU pods).

Check that it fits a pod slice before paying for one (no TPU needed; see docs/aot.md):

  python -m vdm.tools.aot --config configs/scale/dit_1b_480p.py --topology v5p:4x4x4
  python -m vdm.tools.aot --config configs/scale/dit_1b_480p.py --topology v6e:8x8
  python -m vdm.tools.aot --config configs/scale/dit_1b_480p.py --topology v5e:16x16 \
      --config.mesh.shape="{'data': -1, 'fsdp': 8, 'tensor': 2}" \
      --config.train.batch_size=128 --config.optim.accumulate_steps=2 \
      --config.model.scan_layers=true
(measured, docs/aot.md: ~18 GiB per chip on v5p / v6e with this mesh; on a v5e's 16 GiB this
mesh at batch 256 needs 15.91 GiB with scanned blocks (0.09 spare), the v5e overrides above
7.55 GiB: each video shared by a pair of chips, 128 per step x 2 accumulated = 256 per update.
Train on v5e with the same four overrides.)

Train (on the pod, every host runs the same command; latents and T5 embeddings precomputed once
with `python -m vdm.tools.cache`, see "Data" below):

  python train.py --config configs/scale/dit_1b_480p.py --workdir gs://BUCKET/dit_1b_480p \
      --auto_distributed --config.data.source=cache:/data/cache_480p \
      --config.vae.checkpoint=gs://BUCKET/vae_480p

Sizes:
  video      81 frames x 480 x 832 (16:9-ish 480p, Wan's size), 16 fps
  VAE        variant "B" (4 x 8 x 8 compression, 16 latent channels, 59.6M params) -> latents
             21 x 60 x 104 x 16; patch 1 x 2 x 2 -> 21 x 30 x 52 = 32,760 tokens per video
  denoiser   factorized (spatial + temporal + cross attention + MLP per block), width 1536,
             12 heads x 128 (3-D RoPE splits the head dim 44/42/42), depth 14, MLP 6144:
             0.98B params (Denoiser.num_params with the 4096-wide T5 context)
  text       T5 v1.1 XXL encoder ("google/t5-v1_1-xxl": d_model 4096, 24 layers, d_ff 10240, 64
             heads x 64): 4.76B frozen params in bfloat16 (9.5 GB), 256 tokens per caption
  FLOPs      forward 44 TFLOP per video (Denoiser.flops_per_example); a train step ~3x that

Mesh and memory (the design and its arithmetic; check it with vdm.tools.aot, docs/aot.md):
  mesh       data x fsdp = (devices / 8) x 8: parameters, AdamW moments, EMA and the frozen T5
             are split 8 ways along "embed" (fsdp) -- ~20 bytes x 0.98B = 20 GB of trainable
             state (f32 params, 2 moments, EMA, gradients) becomes ~2.5 GB per chip, the T5's
             9.5 GB ~1.2 GB; the batch is split over all chips.
  remat      "block": each block's activations are recomputed in the backward pass. Without it
             (back-of-envelope) one video keeps ~5 GB per block -- the spatial attention
             probabilities alone are 21 frames x 12 heads x 1560^2 = 0.6G values -- ~70 GB for
             14 blocks, more than any chip but a v5p holds.
  batch      one video per chip (global 64 on v5p-128 / v6e-64); on v5e-256 one per pair of
             chips with tensor=2, 128 per step x 2 accumulated (see above).
  Data       cached: the step runs the denoiser only. Encoding 480p x 81 frames with the VAE in
             the step means full-resolution VAE activations of 81 x 480 x 832 x 64 channels
             (4.1 GB in bf16 per tensor, several alive at once) per video; the T5-XXL encode is
             cheap but its weights are a step argument either way (see docs/aot.md). Compile
             the raw-video step with --config.data.source=folder:/x to compare.
"""

from configs import base
from vdm.models import denoiser


def get_config():
    c = base.get_config()
    c.stage = "denoiser"
    c.parallel = "jit"

    c.data.source = "cache:/data/cache_480p"  # built by `python -m vdm.tools.cache`.
    c.data.num_frames = 81
    c.data.height = 480
    c.data.width = 832
    c.data.fps = 16
    c.data.num_workers = 8

    c.vae.variant = "B"
    c.vae.spatial_factor = 8
    c.vae.temporal_factor = 4
    c.vae.latent_channels = 16
    c.vae.dtype = "bfloat16"
    c.vae.decode_chunk = 2

    c.text_encoder.name = "google/t5-v1_1-xxl"
    c.text_encoder.max_length = 256
    c.text_encoder.dtype = "bfloat16"

    denoiser.apply_variant(c.model, "B")
    c.model.depth = 14
    c.model.width = 1536
    c.model.num_heads = 12
    c.model.mlp_ratio = 4.0
    c.model.patch_size = (1, 2, 2)
    c.model.attention = "factorized"
    c.model.qk_norm = True
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "block"

    c.diffusion.shift = 3.0  # 32k-token latents: spend more steps at high noise (SD3 / Wan).

    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 2000
    c.optim.ema_decay = 0.9999

    c.train.num_steps = 200_000
    c.train.batch_size = 64
    c.train.log_every_steps = 100
    c.train.eval_every_steps = 10_000
    c.train.sample_every_steps = 10_000
    c.checkpoint.every_steps = 2000

    c.mesh.shape = {"data": -1, "fsdp": 8, "tensor": 1}

    c.sample.num_steps = 50
    c.sample.guidance = 5.0
    return c
