"""Wan 2.1 DiT (vdm.models.wan.transformer) against diffusers' WanTransformer3DModel.

A tiny random WanTransformer3DModel (every param drawn at random, so zero-initialised parts
cannot hide a wrong mapping) is saved with `save_pretrained` (single file, sharded, bfloat16),
loaded by vdm without torch and run on the same latents, timesteps and zero-padded text.
"""

import copy
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import wan_tiny
from jax.sharding import Mesh

from configs.base import get_config
from vdm.errors import ConfigError
from vdm.models.wan import transformer as wt
from vdm.models.wan.transformer_weights import abstract_params, load_transformer
from vdm.parallel import mesh as mesh_lib

CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=6,
    text_dim=32,
    freq_dim=256,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
TEXT_LEN = 8
SEQ_LENS = (5, 8)  # real tokens per prompt; the rest are zeros (WanPipeline's padding).


def _torch_model(config=None):
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**(config or CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random everything (norm scales around 1) so no zero-initialised param can hide a
            # mapping error.
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"fp32" | "sharded" | "bf16": pipeline dir} and the torch model."""
    root = tmp_path_factory.mktemp("wan")
    model = _torch_model()
    dirs = {}
    for kind in ("fp32", "sharded", "bf16"):
        pipe = root / kind
        pipe.mkdir()
        (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
        if kind == "bf16":
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(pipe / "transformer")
        else:
            shard = dict(max_shard_size="40KB") if kind == "sharded" else {}
            model.save_pretrained(pipe / "transformer", **shard)
        dirs[kind] = str(pipe)
    assert any("index.json" in f for f in os.listdir(os.path.join(dirs["sharded"], "transformer")))
    return dirs, model


def _inputs(batch=2, frames=3, height=4, width=6, seed=0, config=None):
    """Channels-last latents, scheduler timesteps and zero-padded text embeddings."""
    config = config or CONFIG
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, height, width, config["in_channels"]), np.float32)
    t = rng.uniform(0, 1000, (batch,)).astype(np.float32)
    ctx = rng.standard_normal((batch, TEXT_LEN, config["text_dim"]), np.float32)
    for i in range(batch):
        ctx[i, SEQ_LENS[i % len(SEQ_LENS)] :] = 0.0
    return x, t, ctx


def _torch_out(model, x, t, ctx, dtype=torch.float32):
    with torch.no_grad():
        out = model(
            torch.from_numpy(x).permute(0, 4, 1, 2, 3).to(dtype),  # [B, C, T, H, W]
            torch.from_numpy(t),
            torch.from_numpy(ctx).to(dtype),
            return_dict=False,
        )[0]
    return out.float().permute(0, 2, 3, 4, 1).numpy()


def _bf16_like_from_pretrained(model):
    """`model` in bfloat16 except `_keep_in_fp32_modules`, what `from_pretrained(torch_dtype=
    torch.bfloat16)` gives (diffusers' loader needs accelerate for that, which the test extra
    does not install; the parameter-name match is diffusers' `load_model_dict_into_meta`)."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    keep = model._keep_in_fp32_modules
    for name, p in model.named_parameters():
        if any(m in name.split(".") for m in keep):
            p.data = p.data.float()
    return model


def _errors(got, want):
    abs_err = float(np.abs(got - want).max())
    return abs_err, abs_err / float(np.abs(want).max())


def test_float32_parity_single_and_sharded_files(saved):
    dirs, model = saved
    x, t, ctx = _inputs()  # 3 latent frames: a (4k + 1 = 9)-frame video
    want = _torch_out(model, x, t, ctx)
    module, params = load_transformer(dirs["fp32"], jnp.float32)
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, t, ctx))
    assert got.shape == x.shape[:4] + (CONFIG["out_channels"],)
    abs_err, rel_err = _errors(got, want)
    print(f"float32 vs diffusers: max abs {abs_err:.2e}, relative {rel_err:.2e}")
    assert rel_err <= 1e-4, (abs_err, rel_err)
    _, sharded = load_transformer(os.path.join(dirs["sharded"], "transformer"), jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


def test_float32_parity_other_layout(tmp_path):
    """Patches over time (pt = 2), a head dim not divisible by 6 (22 -> t, h, w = 10, 6, 6),
    3 heads, no cross-attention norm, in != out channels."""
    config = dict(CONFIG, patch_size=(2, 1, 2), num_attention_heads=3, attention_head_dim=22)
    config.update(in_channels=3, out_channels=5, text_dim=12, ffn_dim=40, num_layers=1)
    config["cross_attn_norm"] = False
    model = _torch_model(config)
    model.save_pretrained(tmp_path / "transformer")
    x, t, ctx = _inputs(batch=1, frames=4, height=3, width=4, seed=4, config=config)
    module, params = load_transformer(str(tmp_path / "transformer"))
    assert "norm2" not in params["blocks_0"]
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, t, ctx))
    abs_err, rel_err = _errors(got, _torch_out(model, x, t, ctx))
    print(f"other layout float32 vs diffusers: max abs {abs_err:.2e}, relative {rel_err:.2e}")
    assert got.shape == (1, 4, 3, 4, 5) and rel_err <= 1e-4


def test_shared_tiny_model(tmp_path):
    """The tiny transformer of tests/wan_tiny.py (the pipeline tests' model): head dim 12,
    rope_max_seq_len 32, zero-padded text."""
    model = wan_tiny.transformer()
    model.save_pretrained(tmp_path / "transformer")
    x, t, ctx = _inputs(batch=2, frames=2, height=4, width=4, seed=5, config=model.config)
    module, params = load_transformer(str(tmp_path / "transformer"))
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, t, ctx))
    abs_err, rel_err = _errors(got, _torch_out(model, x, t, ctx))
    print(f"wan_tiny float32 vs diffusers: max abs {abs_err:.2e}, relative {rel_err:.2e}")
    assert rel_err <= 1e-4
    with pytest.raises(ValueError, match="rope_max_seq_len=32"):
        module.apply({"params": params}, np.zeros((1, 33, 2, 2, 4), np.float32), t[:1], ctx[:1])


def test_bfloat16_checkpoint(saved):
    dirs, model = saved
    x, t, ctx = _inputs(seed=1)
    module, params = load_transformer(dirs["bf16"], jnp.float32)
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, t, ctx))
    # bf16 weights read exactly: equal to torch running the bf16-rounded weights in float32.
    rounded = copy.deepcopy(model)
    for p in rounded.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    abs_err, rel_err = _errors(got, _torch_out(rounded, x, t, ctx))
    print(f"bf16 file, float32 compute: max abs {abs_err:.2e}, relative {rel_err:.2e}")
    assert rel_err <= 1e-4
    # bf16 compute against diffusers' bf16 model (fp32 islands on both sides): loose.
    module16, params16 = load_transformer(dirs["bf16"], jnp.bfloat16)
    assert params16["blocks_0"]["attn1"]["to_q"]["kernel"].dtype == jnp.bfloat16
    assert params16["blocks_0"]["scale_shift_table"].dtype == jnp.float32
    got16 = np.asarray(jax.jit(module16.apply)({"params": params16}, x, t, ctx))
    torch16 = _bf16_like_from_pretrained(rounded)
    abs_err, rel_err = _errors(got16, _torch_out(torch16, x, t, ctx, torch.bfloat16))
    print(f"bf16 compute vs diffusers bf16: max abs {abs_err:.2e}, relative {rel_err:.2e}")
    assert rel_err <= 2e-2


def test_mesh_equals_one_device(saved):
    dirs, _ = saved
    rules = get_config().mesh.logical_axis_rules
    x, t, ctx = _inputs(batch=4, frames=4, seed=2)
    module, params = load_transformer(dirs["fp32"], jnp.float32)
    want = np.asarray(jax.jit(module.apply)({"params": params}, x, t, ctx))
    devices = np.array(jax.devices()[:8])
    for shape in ((2, 2, 1, 2), (1, 2, 2, 2)):  # (data, fsdp, sequence, tensor)
        mesh = Mesh(devices.reshape(shape), mesh_lib.MESH_AXES)
        # (sequence = 2: the 4 token frames split, joint attention by Ulysses all-to-alls)
        module, sharded = load_transformer(dirs["fp32"], mesh=mesh, logical_axis_rules=rules)
        kernel = sharded["blocks_0"]["attn1"]["to_q"]["kernel"]
        assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
        run = jax.jit(mesh_lib.with_sharding_rules(module.apply, mesh, rules))
        got = np.asarray(run({"params": sharded}, x, t, ctx))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(shape))


def test_remat_and_rope_layout(saved):
    dirs, _ = saved
    x, t, ctx = _inputs(batch=1, frames=5, seed=3)  # 5 latent frames (a 17-frame video)
    plain, params = load_transformer(dirs["fp32"])
    want = jax.jit(plain.apply)({"params": params}, x, t, ctx)
    for remat in ("block", "dots"):
        module, _ = load_transformer(dirs["fp32"], remat=remat)
        if remat == "block":  # (remat changes no forward value; one compile shows it)
            got = jax.jit(module.apply)({"params": params}, x, t, ctx)
            np.testing.assert_array_equal(got, want)
        # The backward pass recomputes each block: one checkpoint per block in its program
        # (gradients are JAX's to get right; compiling them here costs a minute of CPU).
        loss = lambda p, m=module: m.apply({"params": p}, x, t, ctx).sum()  # noqa: E731
        text = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert text.count("remat2[") == CONFIG["num_layers"], remat
    text = str(
        jax.make_jaxpr(jax.grad(lambda p: plain.apply({"params": p}, x, t, ctx).sum()))(params)
    )
    assert "remat2[" not in text
    # Head dim 16 splits (t, h, w) = (8, 4, 4), as diffusers' WanRotaryPosEmbed.
    assert wt.rope_split(16) == (8, 4, 4) and wt.rope_split(128) == (44, 42, 42)


def test_config_errors(saved, tmp_path):
    with pytest.raises(ConfigError, match="image-to-video"):
        wt.WanTransformerConfig.from_diffusers({**CONFIG, "image_dim": 1280})
    with pytest.raises(ConfigError, match="image-to-video"):
        wt.WanTransformerConfig.from_diffusers({**CONFIG, "added_kv_proj_dim": 5120})
    with pytest.raises(ConfigError, match="qk_norm"):
        wt.WanTransformerConfig.from_diffusers({**CONFIG, "qk_norm": "rms_norm"})
    with pytest.raises(ConfigError, match="WanVACE"):
        wt.WanTransformerConfig.from_diffusers({"_class_name": "WanVACETransformer3DModel"})
    # Weights that do not fit the config: the message names the tensor.
    dirs, _ = saved
    src = os.path.join(dirs["fp32"], "transformer")
    bad = tmp_path / "transformer"
    bad.mkdir()
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    (bad / "config.json").write_text(json.dumps({**config, "ffn_dim": 48}))
    os.symlink(
        os.path.join(src, "diffusion_pytorch_model.safetensors"),
        bad / "diffusion_pytorch_model.safetensors",
    )
    with pytest.raises(ValueError, match=r"ffn\.net\..*does not fit"):
        load_transformer(str(bad))
    (bad / "config.json").write_text(json.dumps({**config, "num_layers": 1}))
    with pytest.raises(ValueError, match="blocks.1"):
        load_transformer(str(bad))


@pytest.mark.parametrize(
    "size",
    [
        # Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers transformer/config.json (the sizes).
        dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
        dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    ],
)
def test_published_sizes_param_count(size):
    config = {**CONFIG, **size, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16}
    config["text_dim"] = 4096
    with torch.device("meta"):
        reference = diffusers.WanTransformer3DModel(**config)
    want = sum(p.numel() for p in reference.parameters())
    module = wt.WanTransformer(wt.WanTransformerConfig.from_diffusers(config))
    abstract = mesh_lib.unbox(abstract_params(module))
    got = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert got == want
