"""Joint-attention denoiser in Wan 2.1 1.3B's shape (1.84B params here), 480p x 81 frames, umT5-XXL.

One "full" attention over all 32,760 tokens of a video per block (no spatial / temporal split),
Wan 2.1 1.3B's shape: width 1536, 30 blocks, 12 heads x 128, MLP 8960, patch 1 x 2 x 2 over the
same VAE "B" latents (4 x 8 x 8, 16 channels) as configs/scale/dit_1b_480p.py. Check that it fits
before booking a slice (no TPU needed; docs/aot.md, "Joint attention and 720p"):

  python -m vdm.tools.aot --config configs/scale/dit_joint_480p.py --topology v5p:4x4x12
  python -m vdm.tools.aot --config configs/scale/dit_joint_480p.py --topology v6e:4x4 \
      --config.mesh.shape="{'data': -1, 'fsdp': 16, 'sequence': 1, 'tensor': 1}" \
      --config.train.batch_size=16
(measured, docs/aot.md: 9.94 GiB of 95 per v5p chip with this config's mesh, splash + Ulysses;
14.13 GiB of 32 per v6e chip, splash, one video per chip; the XLA attention on v6e does not
fit: 80 GiB of temporaries.)

Sizes:
  video      81 frames x 480 x 832 -> latents 21 x 60 x 104 x 16 -> 21 x 30 x 52 = 32,760 tokens
  denoiser   joint attention, width 1536, 12 heads x 128, depth 30, MLP 8960 (mlp_ratio 35/6):
             1.84B params (Denoiser.num_params), not Wan's 1.3B: every block here has its own
             adaLN modulation (6 x 1536^2) and cross-attention k / v read the 4096-wide text
             context directly (2 x 4096 x 1536), ~0.8B more over 30 blocks; compute per token is
             Wan's (forward 283 TFLOP per video, 201 T of it attention)
  text       umT5-XXL encoder (d_model 4096), 512 tokens per caption (Wan's), frozen, bfloat16

Mesh and kernel:
  attention  the splash kernel ("auto" on TPU): a joint attention's logits are 12 x 32,760^2
             float32 = 51.5 GB per video per block with the XLA attention; splash never writes
             them to HBM.
  sequence   the 21 token frames are split over a `sequence` axis of 3 (21 = 3 x 7; ulysses
             needs it to divide the 12 heads too): each chip holds 7 frames (10,920 tokens) of a
             video and the joint attention runs over all 32,760 by two all-to-alls of q, k, v, o
             per block (Ulysses: 4 heads per chip). A `sequence` size must divide 21, so the
             slice needs a factor of 3 (v5p:4x4x12 = 192 chips: data 4 x fsdp 16 x sequence 3,
             batch 64). On the power-of-two v6e slices there is none: one video per chip there.
  remat      "block"; scan_layers (compile time and host memory independent of depth).
"""

from configs.scale import dit_1b_480p


def get_config():
    c = dit_1b_480p.get_config()
    c.text_encoder.name = "google/umt5-xxl"
    c.text_encoder.max_length = 512
    c.model.attention = "full"
    c.model.depth = 30
    c.model.width = 1536
    c.model.num_heads = 12  # x 128 head dim
    c.model.mlp_ratio = 35 / 6  # MLP 8960, Wan 2.1 1.3B's
    c.model.remat = "block"
    c.model.scan_layers = True
    c.model.sequence_parallel = "ulysses"
    c.mesh.shape = {"data": -1, "fsdp": 16, "sequence": 3, "tensor": 1}
    c.train.batch_size = 64  # one video per (data x fsdp) shard of v5p:4x4x12
    return c
