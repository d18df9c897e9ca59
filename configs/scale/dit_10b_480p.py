"""~10B-parameter factorized space-time denoiser, 480p x 81 frames, T5-XXL text encoder (TPU pods).

The 1B config (configs/scale/dit_1b_480p.py) scaled in width and depth; same data, VAE, text
encoder and sampler. Check that it fits before booking the pod (no TPU needed; docs/aot.md):

  python -m vdm.tools.aot --config configs/scale/dit_10b_480p.py --topology v5p:4x4x4
  python -m vdm.tools.aot --config configs/scale/dit_10b_480p.py --topology v6e:8x8 \
      --config.mesh.shape="{'data': -1, 'fsdp': 32, 'tensor': 2}" \
      --config.train.batch_size=32 --config.optim.accumulate_steps=2
(measured, docs/aot.md: 35.1 GiB of 95 per v5p chip with this config's mesh; on a v6e's 32 GiB
this mesh needs 32.25 GiB, and fsdp=32 x tensor=2 at the same batch 37.77 GiB: a tensor axis
splits heads and MLP but holds a replica of its batch shard, so it only helps with fewer videos
per (data x fsdp) shard. With the three v6e overrides above each video is shared by a pair of
chips, 32 videos per step x 2 accumulated = 64 per update as on v5p: 22.95 GiB per chip. Train
on v6e with the same three overrides.)

Train (every host runs the same command; latents and T5 embeddings precomputed with
`python -m vdm.tools.cache`):

  python train.py --config configs/scale/dit_10b_480p.py --workdir gs://BUCKET/dit_10b_480p \
      --auto_distributed --config.data.source=cache:/data/cache_480p \
      --config.vae.checkpoint=gs://BUCKET/vae_480p

Sizes:
  video      81 frames x 480 x 832 -> VAE "B" latents 21 x 60 x 104 x 16 -> patch 1 x 2 x 2 ->
             32,760 tokens per video
  denoiser   factorized, width 3072, 24 heads x 128, depth 36, MLP 12288: 9.93B params
  text       T5 v1.1 XXL encoder, 4.76B frozen params in bfloat16, 256 tokens per caption
  FLOPs      forward 0.43 PFLOP per video (Denoiser.flops_per_example); a train step ~3x that

Mesh and memory (the design and its arithmetic; check it with vdm.tools.aot, docs/aot.md):
  mesh       fsdp over 64 devices (data = devices / 64): the 9.93B params' float32 state
             (params + 2 AdamW moments + EMA = 16 bytes/param, 158 GB, plus 40 GB of gradients
             in the step) is split 64 ways -> ~3 GB per chip; the frozen T5 9.5 GB -> 0.15 GB.
  remat      "block": only each block's input is kept for the backward pass (36 x one 32,760 x
             3072 activation, ~0.2-0.4 GB each, per video); without it activations alone exceed
             any chip's HBM (back-of-envelope: ~10 GB per block per video).
  batch      one video per chip (v5p); on v6e one per pair of chips with tensor=2 and 2
             accumulated steps (see above).
  scan       model.scan_layers: the 36 blocks are one nn.scan, so the program holds one block and
             compile time and compiler memory do not grow with depth. Unrolled, the train-step
             compile was OOM-killed at 24.3 GB of host RAM on a 24 GiB machine.
"""

from configs.scale import dit_1b_480p


def get_config():
    c = dit_1b_480p.get_config()
    c.model.depth = 36
    c.model.width = 3072
    c.model.num_heads = 24  # x 128 head dim
    c.model.mlp_ratio = 4.0  # MLP 12288
    c.model.remat = "block"
    c.model.scan_layers = True
    c.mesh.shape = {"data": -1, "fsdp": 64, "tensor": 1}
    c.train.batch_size = 64  # one video per chip on a 64-chip slice
    return c
