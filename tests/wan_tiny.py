"""Tiny random Wan 2.1 parts in the hub's file layout, built with the reference implementations
(diffusers, transformers, tokenizers; torch CPU from the test extra) for the parity tests.

`save_pipeline(path)` writes a whole `WanPipeline` (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/) exactly as `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` is laid out,
and returns the torch pipeline. Zero- and one-initialised parameters are randomised so that a
wrong mapping or a missing term changes the output. The tokenizer is a small Unigram model
(SentencePiece-style, like UMT5's) with T5's "</s>" suffix, trained on a few sentences.
"""

from __future__ import annotations

import torch

CORPUS = [
    "a cat walks on the grass",
    "a dog runs in the park at noon",
    "the digit 3 moves to the left",
    "a red car drives down the road at night",
    "waves crash on a rocky shore",
]


def tokenizer():
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    special = ["<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(
        CORPUS * 10,
        trainers.UnigramTrainer(vocab_size=100, special_tokens=special, unk_token="<unk>"),
    )
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter drawn anew (zero-initialised gates and output layers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def text_encoder(vocab_size: int, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    return randomize(UMT5EncoderModel(config), seed, scale=0.5)


def transformer(seed: int = 1):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return randomize(model, seed)


def vae(seed: int = 2):
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    return randomize(model, seed, scale=0.1)


def pipeline(scheduler: str = "unipc", shift: float = 3.0):
    """A tiny random torch `WanPipeline` ("unipc": Wan's default scheduler; or "euler")."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
    )

    tok = tokenizer()
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
        )
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=text_encoder(len(tok)),
        transformer=transformer(),
        vae=vae(),
        scheduler=sched,
    )


def save_pipeline(path: str, scheduler: str = "unipc", shift: float = 3.0):
    """Writes a tiny random WanPipeline to `path` in the hub layout; returns the torch pipeline."""
    pipe = pipeline(scheduler, shift)
    pipe.save_pretrained(path)
    return pipe
