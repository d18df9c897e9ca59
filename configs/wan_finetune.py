"""Fine-tune Wan 2.1 text-to-video (1.3B, Diffusers format) on a folder of your own clips.

Stage "wan" (vdm/tasks/wan.py): Wan's flow-matching loss on a latent cache built with Wan's own
VAE and UMT5, starting from `model.pretrained`. Full fine-tuning by default; `:lora` trains rank-32
adapters on the attention and feed-forward projections only (`optim.lora_rank`).

  # 1. Cache the clips (folder layout: vdm/data/folder.py) with the Wan VAE and UMT5 (once):
  python -m vdm.tools.cache --config configs/wan_finetune.py --output cache/wan \
      --config.data.source=folder:/data/clips --batch_size 1
  # 2. Fine-tune (fully, or with LoRA: --config configs/wan_finetune.py:lora):
  python train.py --config configs/wan_finetune.py --workdir workdirs/wan
  # 3. Sample the fine-tuned model (merged LoRA included), or export it as a Diffusers directory:
  python sample.py --checkpoint workdirs/wan --prompt "a cat walks on the grass"
  python -m vdm.tools.export --checkpoint workdirs/wan --output exported/wan-tuned

`model.pretrained` is a Diffusers-format Wan 2.1 pipeline directory or hub id (a hub id must be in
the local Hugging Face cache or downloadable); the cache's manifest records it and training
refuses a cache built from another model. Overrides are those of configs/base.py, e.g.
`--config.data.num_frames=33 --config.train.batch_size=2`. Of `model`, only pretrained, dtype,
param_dtype, remat, attention_kernel and sequence_parallel apply (the rest describes vdm's own
denoiser); the architecture is the pipeline's.
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.stage = "wan"
    c.model.pretrained = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    c.model.dtype = "bfloat16"  # compute; params and optimizer stay float32
    c.model.param_dtype = "float32"
    c.model.remat = "block"  # 81 x 480 x 832 is 32,760 tokens per video
    c.text_encoder.name = c.model.pretrained  # informational: the cache encodes with its UMT5
    c.text_encoder.max_length = 512  # Wan's max_sequence_length
    c.data.source = "cache:cache/wan"
    c.data.num_frames, c.data.height, c.data.width, c.data.fps = 81, 480, 832, 16
    c.vae.temporal_factor, c.vae.spatial_factor = 4, 8  # Wan's VAE (for config validation)
    d = c.diffusion
    d.objective = "flow"
    d.time_sampling = "uniform"  # then shifted: the sampler's schedule (vdm/tasks/wan.py)
    d.shift = 3.0  # the 1.3B pipeline's scheduler flow_shift
    d.num_train_timesteps = 1000
    d.cfg_dropout = 0.1
    o = c.optim
    o.learning_rate = 1e-5
    o.warmup_steps = 50
    o.decay = "constant"
    o.weight_decay = 0.01
    o.grad_clip = 1.0
    o.ema_decay = 0.0  # an EMA would double the weights' memory; short fine-tunes do not need it
    t = c.train
    t.num_steps = 2000
    t.batch_size = 4
    t.log_every_steps = 10
    t.eval_every_steps = 0  # no in-training previews (sample the checkpoint with sample.py)
    c.checkpoint.every_steps = 250
    c.checkpoint.max_to_keep = 2
    if arg == "lora":
        o.lora_rank = 32
        o.lora_alpha = 32.0
        o.learning_rate = 1e-4
        # The frozen base in bfloat16: the forward casts every kernel to the bfloat16 compute
        # dtype anyway, so float32 storage only costs memory (14B on v6e:2x2: 14.6 -> 7.9 GiB of
        # arguments and 36.0 -> 24.7 of temporaries per chip, docs/aot.md). Adapters: float32.
        c.model.param_dtype = "bfloat16"
    elif arg:
        raise ValueError(f"configs/wan_finetune.py takes ':lora' or nothing, not {arg!r}.")
    return c
