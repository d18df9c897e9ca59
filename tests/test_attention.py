"""The attention function and its kernels (vdm.models.attention), on CPU.

The Pallas splash kernel runs in the Pallas interpreter ("splash_interpret": the same kernel code
as on TPU) and is checked against the XLA path, forward and gradients, at tiny shapes whose lengths
are not multiples of the kernel's 128-token blocks, with masked (padded) text keys, under a mesh
(the shard_map wrapper) and inside a whole denoiser.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from configs import base
from vdm import config as config_lib
from vdm.errors import ConfigError
from vdm.models import attention as A
from vdm.models import denoiser as dn

H, D = 2, 16
# Key masks of a 4-example cross attention to 8 text tokens: padded captions, the last one empty.
TEXT_MASK = np.array(
    [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8, [1, 0, 0, 0, 0, 0, 0, 0], [0] * 8], dtype=bool
)


def _qkv(b, sq, sk, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, s, H, D)).astype(np.float32) for s in (sq, sk, sk))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@functools.partial(jax.jit, static_argnames="kernel")
def _value_and_grads(q, k, v, mask, kernel):
    """Attention output and d(sum(sin(out)))/d(q, k, v) (a loss that weighs every output)."""

    def loss(q, k, v):
        y = A.attention(q, k, v, mask=mask, kernel=kernel)
        return jnp.sum(jnp.sin(y)), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return y, grads


def _assert_kernels_agree(q, k, v, mask):
    y_ref, g_ref = _value_and_grads(q, k, v, mask, "xla")
    y, g = _value_and_grads(q, k, v, mask, "splash_interpret")
    np.testing.assert_allclose(y, y_ref, atol=2e-6)
    for name, a, b in zip("qkv", g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"d/d{name}")
    return y


def test_splash_equals_xla_self_attention_over_several_blocks():
    """300 tokens: three 128-token blocks for q and kv, the last one padded (segment ids)."""
    assert A.splash_blocks(300) == (128, 384)
    _assert_kernels_agree(*_qkv(1, 300, 300), None)


def test_splash_equals_xla_cross_attention_with_padded_text():
    y = _assert_kernels_agree(*_qkv(4, 80, 8, seed=1), jnp.asarray(TEXT_MASK))
    assert np.all(np.asarray(y[3]) == 0)  # no caption token: zero output, not an average
    # Padded tokens are not attended: changing their keys and values changes nothing.
    q, k, v = _qkv(4, 80, 8, seed=1)
    noise = jnp.where(jnp.asarray(TEXT_MASK)[:, :, None, None], 0.0, 100.0)
    y2 = jax.jit(functools.partial(A.attention, kernel="splash_interpret"))(
        q, k + noise, v + noise, mask=jnp.asarray(TEXT_MASK)
    )
    np.testing.assert_allclose(y2, y, atol=1e-6)


def test_splash_under_a_mesh_runs_in_shard_map_and_equals_xla():
    """Batch over (data, fsdp), heads over tensor: the kernel runs per shard (shard_map)."""
    q, k, v = _qkv(4, 80, 8, seed=2)
    mask = jnp.asarray(TEXT_MASK)
    ref = A.attention(q, k, v, mask=mask, kernel="xla")
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = base.get_config().mesh.logical_axis_rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        args = [jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in (q, k, v)]
        fn = jax.jit(functools.partial(A.attention, kernel="splash_interpret"))
        lowered = fn.lower(*args, mask=mask)
        assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
        y = lowered.compile()(*args, mask=mask)
    np.testing.assert_allclose(y, ref, atol=2e-6)


def _rel(a, b) -> float:
    """max |a - b| / max |b|, in float32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("sq,sk,masked", [(200, 200, False), (80, 8, True)])
def test_splash_equals_xla_in_bfloat16(sq, sk, masked):
    """bfloat16 inputs (padded blocks; masked text keys with an empty caption): splash and XLA
    forward and gradients, each within 2e-2 (relative to the largest value) of the float32 XLA
    attention of the same bfloat16-rounded inputs, and of each other."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(4, sq, sk, seed=3))
    mask = jnp.asarray(TEXT_MASK) if masked else None
    ref_y, ref_g = _value_and_grads(*(x.astype(jnp.float32) for x in (q, k, v)), mask, "xla")
    out = {
        kernel: _value_and_grads(q, k, v, mask, kernel) for kernel in ("xla", "splash_interpret")
    }
    for y, g in out.values():
        assert y.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g)
        assert _rel(y, ref_y) <= 2e-2
        for name, a, b in zip("qkv", g, ref_g, strict=True):
            assert _rel(a, b) <= 2e-2, f"d/d{name}"
    (y, g), (y_xla, g_xla) = out["splash_interpret"], out["xla"]
    assert _rel(y, y_xla) <= 2e-2
    for a, b in zip(g, g_xla, strict=True):
        assert _rel(a, b) <= 2e-2
    if masked:
        assert not np.asarray(y[3], np.float32).any()  # no caption token: zero output


@pytest.mark.parametrize(
    "platform,dtype,expected",
    [
        ("cpu", jnp.float32, "xla"),
        ("cpu", jnp.bfloat16, "xla"),
        ("gpu", jnp.bfloat16, "cudnn"),
        ("gpu", jnp.float16, "cudnn"),
        ("gpu", jnp.float32, "xla"),  # cuDNN has no float32 flash kernel
        ("tpu", jnp.float32, "splash"),
        ("tpu", jnp.bfloat16, "splash"),
    ],
)
def test_auto_picks_the_kernel_per_platform(platform, dtype, expected):
    assert A.select_kernel("auto", platform, dtype) == expected


def test_explicit_kernels_and_the_platform_override():
    assert A.select_kernel("xla", "tpu") == "xla"
    assert A.select_kernel("splash", "tpu") == "splash"
    assert A.select_kernel("cudnn", "gpu", jnp.bfloat16) == "cudnn"
    assert A.select_kernel("splash_interpret", "cpu") == "splash_interpret"
    assert A.current_platform() == "cpu"
    with A.target_platform("tpu"):
        assert A.current_platform() == "tpu"
    assert A.current_platform() == "cpu"


def test_a_kernel_that_cannot_serve_the_platform_or_shape_is_a_clear_error():
    q, k, v = _qkv(1, 8, 8)
    with pytest.raises(ConfigError, match=r"'cudnn' needs an NVIDIA GPU.*'cpu'.*'auto'"):
        A.attention(q, k, v, kernel="cudnn")
    with pytest.raises(ConfigError, match=r"'splash' needs a TPU.*'splash_interpret'"):
        A.attention(q, k, v, kernel="splash")
    with pytest.raises(ConfigError, match=r"not one of"):
        A.select_kernel("flash", "cpu")
    wide = jnp.zeros((1, 8, 1, 4096), jnp.bfloat16)  # a head dim beyond the kernel's VMEM tiles
    with pytest.raises(ConfigError, match=r"splash_interpret.*\(1, 8, 1, 4096\).*not 4096.*xla"):
        A.attention(wide, wide, wide, kernel="splash_interpret")
    with pytest.raises(ConfigError, match=r"'cudnn'.*float32.*model.dtype='bfloat16'"):
        A.check_shape("cudnn", (1, 8, H, D), (1, 8, H, D), jnp.float32)
    with pytest.raises(ConfigError, match=r"'cudnn'.*head dim 512"):
        A.check_shape("cudnn", (1, 8, 1, 512), (1, 8, 1, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match="model.attention_kernel='flash'"):
        dn.variant_model("mu", attention_kernel="flash")


def test_splash_block_sizes():
    assert A.splash_blocks(80) == (128, 128)
    assert A.splash_blocks(200) == (256, 256)
    assert A.splash_blocks(1024) == (512, 1024)
    assert A.splash_blocks(3600) == (128, 3712)
    assert A.splash_blocks(32760) == (512, 32768)


@pytest.mark.parametrize("mode", ["factorized", "full"])
def test_denoiser_with_splash_equals_xla(mode):
    """Spatial + temporal ("factorized") or joint ("full") self-attention and cross attention (a
    padded and an empty caption) of a whole forward (one block: the interpreter's compile time
    grows with every kernel call)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 4, 8)).astype(np.float32)
    t = rng.uniform(size=(2,)).astype(np.float32)
    ctx = rng.standard_normal((2, 8, 12)).astype(np.float32)
    mask = TEXT_MASK[2:]
    models = {
        k: dn.variant_model("mu", depth=1, attention=mode, attention_kernel=k)
        for k in ("xla", "splash_interpret")
    }
    # Random params (numpy: no compiles), so the zero-initialised gates and outputs are active.
    abstract = jax.eval_shape(models["xla"].init, jax.random.key(0), x, t, ctx, mask)
    params = jax.tree.map(
        lambda s: 0.2 * rng.standard_normal(s.shape).astype(np.float32),
        nn.unbox(abstract["params"]),
    )
    out = {k: jax.jit(m.apply)({"params": params}, x, t, ctx, mask) for k, m in models.items()}
    assert float(jnp.abs(out["xla"]).mean()) > 0.1
    np.testing.assert_allclose(out["splash_interpret"], out["xla"], atol=1e-5)


def test_old_configs_load_with_the_auto_kernel():
    old = base.get_config().to_dict()
    old["version"] = 1
    del old["model"]["attention_kernel"]
    upgraded = config_lib.upgrade(ConfigDict(old))
    assert upgraded.model.attention_kernel == "auto"
    assert upgraded.version == config_lib.CONFIG_VERSION
    model_cfg = base.get_config().model.to_dict()
    del model_cfg["attention_kernel"]
    assert dn.Denoiser.from_config(model_cfg, 8).attention_kernel == "auto"
    cfg = config_lib.load_config("configs/base.py", {"model.attention_kernel": "splash"})
    assert dn.Denoiser.from_config(cfg.model, 8).attention_kernel == "splash"
