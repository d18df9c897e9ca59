"""The Wan 2.1 VAE (vdm.models.wan.vae) against diffusers' `AutoencoderKLWan` (PyTorch).

A tiny random AutoencoderKLWan (base_dim 8, z_dim 4, dim_mult [1, 2, 2, 2], one residual block,
temperal_downsample [False, True, True]: every layer kind of the real one, 4x8x8 compression) is
saved with `save_pretrained` in the hub's `vae/` layout and loaded with `load_vae`. Its RMS-norm
gammas (ones at init) and conv biases are randomised, so a transposed or dropped tensor fails.
Inputs and outputs are [B, T, H, W, C] in vdm and [B, C, T, H, W] in diffusers.

The programs are compiled with XLA's CPU backend optimisations off (`FAST`): 3x quicker to
compile on a CPU, same float32 arithmetic (the tolerance is 1e-4 relative).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.numpy import load_file, save_file

from vdm.errors import ConfigError
from vdm.models.wan import vae as wan_vae
from vdm.models.wan import vae_layers
from vdm.models.wan.vae_weights import load_vae, torch_name

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    attn_scales=[],
    latents_mean=[0.1, -0.2, 0.3, 0.05],
    latents_std=[1.5, 0.5, 2.0, 1.2],
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _cl(a):  # diffusers [B, C, T, H, W] -> vdm [B, T, H, W, C]
    return np.asarray(a).transpose(0, 2, 3, 4, 1)


def _cf(a):  # vdm [B, T, H, W, C] -> diffusers [B, C, T, H, W]
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 4, 1, 2, 3)))


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _rms(a, b) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(a) - b)) / np.mean(np.square(b))))


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The saved tiny diffusers VAE and its outputs on a 9-frame 16x16 video (channels-last)."""
    torch.manual_seed(0)
    model = AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    vae_dir = str(tmp_path_factory.mktemp("wan") / "vae")
    model.save_pretrained(vae_dir)
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32)
    # Latents far from the encoder's range, so decoded values pass +-1 and the clamp matters.
    loud = (4.0 * rng.standard_normal((1, 5, 2, 2, 4))).astype(np.float32)
    with torch.no_grad():
        post = model.encode(_cf(video)).latent_dist
        mean = _cl(post.mean)
        ref = dict(dir=vae_dir, video=video, mean=mean, logvar=_cl(post.logvar), loud=loud)
        ref["decoded"] = _cl(model.decode(_cf(mean)).sample)
        ref["decoded_loud"] = _cl(model.decode(_cf(loud)).sample)
        # diffusers' own bfloat16 decode of latent frame 0 (how far bfloat16 is from float32).
        half = _cf(mean[:, :1]).to(torch.bfloat16)
        ref["decoded_bf16"] = _cl(model.to(torch.bfloat16).decode(half).sample.float())
    return ref


@pytest.fixture(scope="module")
def loaded(reference):
    return load_vae(reference["dir"])


def test_encode_matches_diffusers(reference, loaded):
    module, params = loaded
    video = jnp.asarray(reference["video"])
    encode = _compiled(lambda p, v: wan_vae.encode(module, p, v), params, video)
    mean, logvar = encode(params, video)
    assert mean.shape == (1, 3, 2, 2, 4) == reference["mean"].shape
    err_mean, err_logvar = _rel(mean, reference["mean"]), _rel(logvar, reference["logvar"])
    print(f"encode rel. max error: mean {err_mean:.2e}, logvar {err_logvar:.2e}")
    assert err_mean <= 1e-4 and err_logvar <= 1e-4


def test_decode_matches_diffusers_in_flat_memory(reference, loaded):
    """Decode is one scan step per latent frame: 3 and 5 latent frames need the same scratch
    memory (only the output grows), and both match diffusers, clamp included."""
    module, params = loaded
    z3, z5 = jnp.asarray(reference["mean"]), jnp.asarray(reference["loud"])
    fn = lambda p, z: wan_vae.decode(module, p, z)  # noqa: E731
    dec3, dec5 = _compiled(fn, params, z3), _compiled(fn, params, z5)
    mem3, mem5 = dec3.memory_analysis(), dec5.memory_analysis()
    temp3, temp5 = mem3.temp_size_in_bytes, mem5.temp_size_in_bytes
    print(f"decode temp bytes: 3 latent frames {temp3}, 5: {temp5}")
    assert temp3 == temp5
    assert mem5.output_size_in_bytes > mem3.output_size_in_bytes
    video3, video5 = dec3(params, z3), dec5(params, z5)
    assert video3.shape == (1, 9, 16, 16, 3) and video5.shape == (1, 17, 16, 16, 3)
    assert np.abs(reference["decoded_loud"]).max() == 1.0  # the clamp is exercised.
    err3, err5 = _rel(video3, reference["decoded"]), _rel(video5, reference["decoded_loud"])
    print(f"decode rel. max error: reference latents {err3:.2e}, 5 loud latent frames {err5:.2e}")
    assert err3 <= 1e-4 and err5 <= 1e-4


def test_bfloat16_load_runs(reference):
    module, params = load_vae(reference["dir"], "bfloat16")
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    z = jnp.asarray(reference["mean"][:, :1])
    video = _compiled(lambda p, z: wan_vae.decode(module, p, z), params, z)(params, z)
    assert video.dtype == jnp.float32 and video.shape == (1, 1, 16, 16, 3)
    ref = reference["decoded"][:, :1]
    err, err_torch = _rms(video, ref), _rms(reference["decoded_bf16"], ref)
    print(f"bfloat16 decode of latent frame 0, rel. RMS error vs float32: {err:.2e} (diffusers' "
          f"bfloat16: {err_torch:.2e})")  # fmt: skip
    assert err < 2 * err_torch


def test_latent_normalization_matches_wan_pipeline(loaded):
    module, _ = loaded
    z = np.random.default_rng(1).standard_normal((1, 2, 2, 2, 4)).astype(np.float32)
    mean = torch.tensor(TINY["latents_mean"]).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(TINY["latents_std"]).view(1, 4, 1, 1, 1)
    expected = _cl(_cf(z) / inv_std + mean)  # WanPipeline, before vae.decode
    np.testing.assert_allclose(wan_vae.denormalize(module, jnp.asarray(z)), expected, rtol=1e-6)
    back = wan_vae.normalize(module, jnp.asarray(expected))
    np.testing.assert_allclose(back, z, rtol=1e-5, atol=1e-6)


def test_params_have_logical_axes(loaded):
    module, params = loaded
    fs = module.spatial_factor
    video = jax.ShapeDtypeStruct((1, 1, fs, fs, 3), jnp.float32)
    boxed = jax.eval_shape(module.init, jax.random.key(0), video)["params"]
    conv = boxed["encoder"]["down_blocks_0"]["conv1"]["kernel"]
    assert conv.names == vae_layers.KERNEL_3D
    assert boxed["decoder"]["up_blocks_0"]["upsamplers_0"]["resample_1"]["kernel"].names == (
        vae_layers.KERNEL_2D
    )
    assert torch_name(("encoder", "down_blocks_2", "resample_1", "kernel")) == (
        "encoder.down_blocks.2.resample.1.weight"
    )


def _copy(reference, tmp_path, edit_config=None, edit_weights=None) -> str:
    out = tmp_path / "vae"
    out.mkdir(parents=True)
    with open(os.path.join(reference["dir"], "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(reference["dir"], WEIGHTS))
    if edit_config:
        edit_config(config)
    if edit_weights:
        edit_weights(tensors)
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / WEIGHTS))
    return str(out)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(is_residual=True), "is_residual=true"),
        (lambda c: c.update(patch_size=2), "patch_size=2"),
        (lambda c: c.update(attn_scales=[0.5]), "attn_scales"),
        (lambda c: c.update(temperal_downsample=[True, True, True]), "chunks of 4 frames"),
        (lambda c: c.update(clip_output=False), "clip_output"),
        (lambda c: c.update(_class_name="AutoencoderKLLTXVideo"), "not AutoencoderKLWan"),
    ],
)
def test_unsupported_config_is_named(reference, tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_vae(_copy(reference, tmp_path, edit_config=edit))


def test_weight_mismatches_are_named(reference, tmp_path):
    name = "decoder.mid_block.attentions.0.proj.weight"

    def rename(t):
        t["decoder.mid_block.attentions.0.extra.weight"] = t.pop(name)

    with pytest.raises(ValueError, match=rf"missing tensors \['{name}'\].*extra\.weight"):
        load_vae(_copy(reference, tmp_path / "a", edit_weights=rename))

    def reshape(t):
        t["quant_conv.weight"] = t["quant_conv.weight"][:4]

    with pytest.raises(ValueError, match=r"wrong shape.*quant_conv\.weight"):
        load_vae(_copy(reference, tmp_path / "b", edit_weights=reshape))


def test_bad_video_shape_is_named(loaded):
    module, params = loaded
    with pytest.raises(ValueError, match="1 \\+ k\\*4"):
        wan_vae.encode(module, params, jnp.zeros((1, 8, 16, 16, 3)))
    with pytest.raises(ValueError, match="multiple of spatial_factor=8"):
        wan_vae.encode(module, params, jnp.zeros((1, 5, 12, 16, 3)))
    with pytest.raises(ValueError, match="latents"):
        wan_vae.decode(module, params, jnp.zeros((1, 2, 2, 2, 3)))
