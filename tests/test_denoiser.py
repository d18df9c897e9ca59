"""Tests of the space-time DiT denoiser (vdm.models.denoiser) at the tiny "mu" size.

Compiles dominate the run time on CPU, so most tests share one jitted forward per model config
and input shape (`_fwd`, keyed by the hashable module), build random params from `eval_shape`
instead of compiling `init`, and compile at XLA backend optimisation level 0 (same math).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import base
from vdm.errors import ConfigError
from vdm.models import denoiser as dn
from vdm.models import layers, patches
from vdm.models.attention import target_platform as A_target
from vdm.models.layers import count_params

C, D_TXT, L_TXT = 8, 12, 5  # latent channels, text width, text length
SHAPE = (4, 4, 4, 4)  # (B, t, h, w) of most tests: one compile per model config
MASK = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]  # last: no caption

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _inputs(shape=SHAPE, seed=0):
    """(x, t, context, mask) as numpy arrays (numpy RNG: no per-shape compiles)."""
    b = shape[0]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*shape, C)).astype(np.float32)
    t = rng.uniform(size=(b,)).astype(np.float32)
    ctx = rng.normal(size=(b, L_TXT, D_TXT)).astype(np.float32)
    mask = np.asarray((MASK * b)[:b], np.int32)
    return x, t, ctx, mask


def _abstract(model):
    """Boxed ShapeDtypeStructs of the params; init saw 3 frames of 4x4 (tests use other shapes)."""
    return jax.eval_shape(model.init, jax.random.key(0), *_inputs((1, 3, 4, 4)))["params"]


def _random_params(model, seed=7, scale=0.2):
    """Random params of `model`'s structure, so zero-initialised gates and outputs are active."""
    flat = traverse_util.flatten_dict(nn.unbox(_abstract(model)), sep="/")
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in sorted(flat.items()):
        noise = scale * rng.normal(size=s.shape).astype(s.dtype)
        out[name] = jnp.asarray(1.0 + noise if name.endswith("scale") else noise)
    return traverse_util.unflatten_dict(out, sep="/")


@functools.partial(_jit, static_argnums=0)
def _fwd(model, params, x, t, ctx, mask):
    return model.apply({"params": params}, x, t, ctx, mask)


def _without_temporal(params):
    """A factorized param tree minus each block's temporal_attn / temporal_mod."""
    return {
        name: {k: v for k, v in sub.items() if not k.startswith("temporal_")}
        if name.startswith("block_")
        else sub
        for name, sub in params.items()
    }


def _flat_shapes(params):
    flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
    return {k: v.shape for k, v in flat.items()}


MU = dn.variant_model("mu", C)


@pytest.fixture(scope="module")
def mu_params():
    return _random_params(MU)


@pytest.mark.parametrize(
    "attention,pos_encoding",
    [("factorized", "rope3d"), ("full", "rope3d"), ("spatial_only", "rope3d"),
     ("factorized", "sincos")],
)  # fmt: skip
def test_output_shapes_and_unseen_frame_counts(attention, pos_encoding):
    model = dn.variant_model("mu", C, attention=attention, pos_encoding=pos_encoding)
    params = _random_params(model)
    # Init saw 3 frames of 4x4; positions must extend to 4 frames, and to 1 frame of 6x8.
    shapes = [SHAPE] + ([(1, 1, 6, 8)] if attention == "factorized" else [])
    for shape in shapes:
        x, t, ctx, mask = _inputs(shape)
        y = _fwd(model, params, x, t, ctx, mask)
        assert y.shape == x.shape and y.dtype == jnp.float32
        assert np.isfinite(np.asarray(y)).all()
        assert float(jnp.abs(y).mean()) > 1e-3  # random params: a real, non-zero output


def test_patchify_round_trip():
    x = np.random.default_rng(0).normal(size=(2, 4, 6, 8, 3))  # numpy: no compiles
    for p in [(1, 1, 1), (1, 2, 2), (2, 3, 4)]:
        tokens = patches.patchify(x, p)
        assert tokens.shape == (2, 4 // p[0], 6 // p[1], 8 // p[2], 3 * p[0] * p[1] * p[2])
        np.testing.assert_array_equal(patches.unpatchify(tokens, p, 3), x)
    # A token holds one contiguous (pt, ph, pw) block of the latent, channels last.
    np.testing.assert_array_equal(patches.patchify(x, (2, 3, 4))[0, 1, 1, 1, :3], x[0, 2, 3, 4])


def test_patch_not_dividing_latent_raises_clear_error():
    model = dn.variant_model("mu", C, patch_size=(2, 2, 2))
    with pytest.raises(ValueError, match=r"not divisible by model\.patch_size=\(2, 2, 2\).*t=5"):
        model.init(jax.random.key(0), *_inputs((1, 5, 4, 4)))
    with pytest.raises(ValueError, match=r"w=7 % 2 = 1"):
        patches.token_grid((5, 8, 7), (1, 2, 2))


def test_invalid_config_raises_clear_error():
    cfg = base.get_config().model
    cfg.attention = "axial"
    with pytest.raises(ValueError, match="model.attention='axial' is not one of"):
        dn.Denoiser.from_config(cfg, C)
    cfg = base.get_config().model
    cfg.num_heads = 3  # 128 / 3 is not an integer head dim
    with pytest.raises(ValueError, match="not divisible by model.num_heads=3"):
        dn.Denoiser.from_config(cfg, C)
    with pytest.raises(ValueError, match="must be even and >= 6"):
        dn.variant_model("mu", C, width=20, num_heads=4)  # head dim 5 cannot hold 3-D RoPE
    with pytest.raises(ValueError, match="Unknown denoiser variant 'XXL'"):
        dn.apply_variant(base.get_config().model, "XXL")
    x, t, ctx, mask = _inputs()
    with pytest.raises(ValueError, match=r"expects latents \[B, t, h, w, 8\]"):
        MU.init(jax.random.key(0), x[..., :4], t, ctx, mask)
    with pytest.raises(ValueError, match="context_mask must be"):
        MU.init(jax.random.key(0), x, t, ctx, mask[:, :2])


def test_param_trees_match_across_attention_modes(mu_params):
    shapes = {a: _flat_shapes(_abstract(dn.variant_model("mu", C, attention=a))) for a in
              ("full", "spatial_only")}  # fmt: skip
    fact = _flat_shapes(mu_params)
    # "full" and "spatial_only" have identical trees; "factorized" = that + temporal_attn/_mod.
    assert shapes["full"] == shapes["spatial_only"]
    temporal = {k for k in fact if k.split("/")[1].startswith("temporal_")}
    assert {k.split("/")[1] for k in temporal} == {"temporal_attn", "temporal_mod"}
    assert {k: v for k, v in fact.items() if k not in temporal} == shapes["full"]
    # The same shared parameters with a different attention give different outputs.
    full = dn.variant_model("mu", C, attention="full")
    y_fact = _fwd(MU, mu_params, *_inputs())
    y_full = _fwd(full, _without_temporal(mu_params), *_inputs())
    assert float(jnp.abs(y_fact - y_full).max()) > 1e-3


@pytest.mark.parametrize("attention", ["spatial_only", "factorized", "full"])
def test_temporal_mixing(attention, mu_params):
    model = dn.variant_model("mu", C, attention=attention)
    params = mu_params if attention == "factorized" else _without_temporal(mu_params)
    x, t, ctx, mask = _inputs()
    j = 2
    x2 = x.copy()
    x2[:, j] += 1.0  # perturb frame j only
    diff = jnp.abs(_fwd(model, params, x2, t, ctx, mask) - _fwd(model, params, x, t, ctx, mask))
    per_frame = np.asarray(diff).transpose(1, 0, 2, 3, 4).reshape(SHAPE[1], -1).max(axis=1)
    assert per_frame[j] > 1e-3
    others = np.delete(per_frame, j)
    if attention == "spatial_only":
        np.testing.assert_array_less(others, 1e-6)  # frames are independent
    else:
        assert (others > 1e-4).all(), per_frame  # information flows across frames


def test_text_mask_hides_padding(mu_params):
    x, t, ctx, mask = _inputs()
    ref = _fwd(MU, mu_params, x, t, ctx, mask)
    # Change only masked-out tokens (row 3 has no real token at all): the output must not move.
    padded = ctx.copy()
    padded[0, 3:], padded[2, 1:], padded[3] = 100.0, -7.0, 5.0
    np.testing.assert_allclose(_fwd(MU, mu_params, x, t, padded, mask), ref, atol=1e-5)
    # Change a real token: that example's output moves, the others do not.
    real = ctx.copy()
    real[0, 1] += 1.0
    diff = np.asarray(jnp.abs(_fwd(MU, mu_params, x, t, real, mask) - ref)).max(axis=(1, 2, 3, 4))
    assert diff[0] > 1e-3 and (diff[1:] < 1e-5).all()


def test_output_zero_at_init_until_final_layer_changes():
    x, t, ctx, mask = _inputs()
    params = nn.unbox(_jit(MU.init)(jax.random.key(1), x, t, ctx, mask)["params"])
    assert _flat_shapes(params) == _flat_shapes(_abstract(MU))
    y = _fwd(MU, params, x, t, ctx, mask)
    np.testing.assert_array_equal(np.asarray(y), 0.0)  # adaLN-Zero + zero output projection
    kernel = params["final_linear"]["kernel"]
    params["final_linear"]["kernel"] = kernel + 0.1 * jax.random.normal(
        jax.random.key(3), kernel.shape
    )
    y = _fwd(MU, params, x, t, ctx, mask)
    assert float(jnp.abs(y).mean()) > 1e-2


def test_remat_variants_match():
    # One block is enough to compare remat policies (and keeps three grad compiles cheap).
    x, t, ctx, mask = _inputs((2, 2, 4, 4))
    params = _random_params(dn.variant_model("mu", C, depth=1))

    def loss_and_grad(remat):
        model = dn.variant_model("mu", C, depth=1, remat=remat)
        assert _flat_shapes(_abstract(model)) == _flat_shapes(params)  # same param tree
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, ctx, mask) ** 2)  # noqa: E731
        jaxpr = str(jax.make_jaxpr(loss)(params))
        assert ("remat" in jaxpr) == (remat != "none"), remat  # the jax.checkpoint primitive
        return _jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grad = loss_and_grad("none")
    for remat in ("block", "dots"):
        loss, grad = loss_and_grad(remat)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _saved_run(path, model):
    """Random ("trained") params of `model`, saved as step 5 of a run at `path` (params + EMA)."""
    from vdm.io import manager

    trained = _random_params(model)
    with manager.CheckpointManager(str(path), async_save=False) as m:
        m.save(5, arrays={"params": trained, "ema": trained})
    return trained


def _fresh_state(model):
    """(a fresh TrainState of `model`'s initial params, its abstract params) for init_from."""
    from vdm.train import state as train_state

    fresh = nn.unbox(model.init(jax.random.key(1), *_inputs((1, 3, 4, 4)))["params"])
    state = train_state.TrainState(step=0, params=fresh, opt_state=(), ema_params=fresh)
    return state, nn.unbox(_abstract(model))


def test_a_model_grown_in_depth_from_a_checkpoint_starts_as_its_function(tmp_path):
    """`train.init_from` + `train.init_new_params`: a depth-1 model's weights start a depth-2 one;
    the added block keeps its fresh (adaLN-Zero) init, so the output is exactly the old model's."""
    from vdm.io import manager
    from vdm.train import state as train_state

    small, big = dn.variant_model("mu", C, depth=1), dn.variant_model("mu", C, depth=2)
    trained, (state, abstract) = _saved_run(tmp_path / "run", small), _fresh_state(big)
    fresh = state.params
    with pytest.raises(ConfigError, match=r"missing in the checkpoint: \['block_1/"):
        train_state.init_params_from(state, str(tmp_path / "run"), abstract)
    grown = train_state.init_params_from(state, str(tmp_path / "run"), abstract, keep_new=True)
    for tree in (grown.params, grown.ema_params):
        assert _flat_shapes(tree) == _flat_shapes(fresh)
        jax.tree.map(np.testing.assert_array_equal, tree["block_0"], trained["block_0"])
        jax.tree.map(np.testing.assert_array_equal, tree["block_1"], fresh["block_1"])
    x, t, ctx, mask = _inputs()
    np.testing.assert_allclose(
        _fwd(big, grown.params, x, t, ctx, mask), _fwd(small, trained, x, t, ctx, mask), atol=1e-6
    )
    # The other way round (the checkpoint has params this model lacks) stays an error.
    with manager.CheckpointManager(str(tmp_path / "big"), async_save=False) as m:
        m.save(5, arrays={"params": grown.params})
    small_state = train_state.TrainState(step=0, params=trained, opt_state=(), ema_params=None)
    with pytest.raises(ConfigError, match=r"not in this model: \['block_1/"):
        train_state.init_params_from(
            small_state, str(tmp_path / "big"), nn.unbox(_abstract(small)), keep_new=True
        )


def test_init_skip_retrains_the_layers_a_patch_size_change_reshapes(tmp_path):
    """`train.init_skip`: a patch-(1,2,2) checkpoint starts a patch-(1,1,1) model. Every block
    comes from the checkpoint; the skipped patch_embed / final_linear (other shapes there) keep
    their fresh initialisation. Without the skip the shape mismatch is named."""
    from vdm.train import state as train_state

    coarse = dn.variant_model("mu", C, depth=1, patch_size=(1, 2, 2))
    fine = dn.variant_model("mu", C, depth=1, patch_size=(1, 1, 1))
    trained, (state, abstract) = _saved_run(tmp_path / "run", coarse), _fresh_state(fine)
    fresh = state.params
    with pytest.raises(ConfigError, match=r"patch_embed/kernel: checkpoint \("):
        train_state.init_params_from(state, str(tmp_path / "run"), abstract)
    with pytest.raises(ConfigError, match="train.init_skip='\\(' is not a valid regex"):
        train_state.init_params_from(state, str(tmp_path / "run"), abstract, skip="(")
    out = train_state.init_params_from(
        state, str(tmp_path / "run"), abstract, skip="^(patch_embed|final_linear)/"
    )
    assert _flat_shapes(out.params) == _flat_shapes(fresh)
    for name in fresh:
        want = fresh if name in ("patch_embed", "final_linear") else trained
        for tree in (out.params, out.ema_params):
            jax.tree.map(np.testing.assert_array_equal, tree[name], want[name])


def test_scan_layers_is_the_same_model_with_stacked_params():
    """`scan_layers` (one nn.scan over the blocks) computes what the unrolled blocks compute on
    the same weights (block_i stacked on a leading axis), also with remat, and its params carry
    the logical axis "layers" in front."""
    x, t, ctx, mask = _inputs((2, 2, 4, 4))
    params = _random_params(dn.variant_model("mu", C, depth=3))
    blocks = [params.pop(f"block_{i}") for i in range(3)]
    scanned = dict(params, blocks={"block": jax.tree.map(lambda *b: jnp.stack(b), *blocks)})
    params.update({f"block_{i}": b for i, b in enumerate(blocks)})
    model = dn.variant_model("mu", C, depth=3, scan_layers=True)
    abstract = _abstract(model)
    assert _flat_shapes(abstract) == _flat_shapes(scanned)
    kernel = abstract["blocks"]["block"]["mlp"]["fc1"]["kernel"]
    assert kernel.names == ("layers", "embed", "mlp") and kernel.value.shape == (3, 32, 128)

    def loss_and_grad(model, p):
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, ctx, mask) ** 2)  # noqa: E731
        return _jit(jax.value_and_grad(loss))(p)

    ref_loss, ref_grad = loss_and_grad(dn.variant_model("mu", C, depth=3), params)
    ref_grad = dict(ref_grad)
    ref_blocks = [ref_grad.pop(f"block_{i}") for i in range(3)]
    ref_grad["blocks"] = {"block": jax.tree.map(lambda *b: jnp.stack(b), *ref_blocks)}
    for remat in ("none", "block"):
        m = dn.variant_model("mu", C, depth=3, scan_layers=True, remat=remat)
        loss, grad = loss_and_grad(m, scanned)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, ref_grad
        )


def test_param_counts_match_formula():
    # mu, factorized, text width 12, by hand: w=32, mlp=128, patch dim 1*2*2*8=32, head dim 16.
    w, m, p, d, f = 32, 128, 32, D_TXT, 256
    attn = 4 * (w * w + w) + 2 * 16  # q, k, v, out (+ biases) and the two qk-norm scales
    mod = w * 3 * w + 3 * w
    block = 3 * attn + 3 * mod + (2 * w * m + m + w) + 2 * w  # + cross-attn LayerNorm
    embeds = (p * w + w) + (f * w + w * w + 2 * w) + 2 * (d * w + w * w + 2 * w)
    expected = embeds + 2 * block + (w * 2 * w + 2 * w + w * p + p)
    assert count_params(_abstract(MU)) == MU.num_params(D_TXT) == expected == 77824
    for kw in [dict(attention="full"), dict(pooled_text=False, qk_norm=False, mlp_ratio=2.0)]:
        model = dn.variant_model("mu", C, **kw)
        assert count_params(_abstract(model)) == model.num_params(D_TXT), kw
    # Named sizes match the formula (abstract init: no memory) and the sizes they are named for.
    targets = {"S": (2e6, 5e6), "B": (120e6, 145e6), "L": (420e6, 480e6), "XL": (640e6, 720e6)}
    for name, (lo, hi) in targets.items():
        model = dn.variant_model(name, C)
        if name in ("S", "B"):
            assert count_params(_abstract(model)) == model.num_params(D_TXT), name
        assert lo < model.num_params(384) < hi, (name, model.num_params(384))


def test_config_and_variants():
    cfg = base.get_config()
    for key, value in dn.VARIANTS["S"].items():  # base.py holds the "S" numbers
        assert cfg.model[key] == value, key
    cfg.lock()
    dn.apply_variant(cfg.model, "B")
    assert (cfg.model.depth, cfg.model.width, cfg.model.num_heads) == (7, 768, 12)
    model = dn.Denoiser.from_config(cfg.model, cfg.vae.latent_channels)
    assert (model.depth, model.width, model.latent_channels) == (7, 768, cfg.vae.latent_channels)
    text = model.summary(latent_shape=(5, 8, 8, 8), context_shape=(32, 384))
    assert "factorized" in text and f"{model.num_params(384):,}" in text and "80 tokens" in text
    params = _random_params(MU)
    assert f"{count_params(params):,}" in MU.summary(params, context_shape=(L_TXT, D_TXT))


def test_flops_estimate_matches_xla():
    model = dn.variant_model("mu", C, width=64, depth=1)
    x, t, ctx, mask = _inputs((1, 3, 8, 8))
    params = _random_params(model)
    lowered = jax.jit(lambda p: model.apply({"params": p}, x, t, ctx, mask)).lower(params)
    xla = lowered.cost_analysis()["flops"]  # HLO cost analysis; no compile needed
    ours = model.flops_per_example((3, 8, 8), L_TXT, D_TXT)
    # XLA also counts elementwise ops (norms, softmax, GELU), which our estimate leaves out.
    assert 0.95 < xla / ours < 1.3, (xla, ours)


def test_dropout_and_bfloat16(mu_params):
    x, t, ctx, mask = _inputs()
    ref = _fwd(MU, mu_params, x, t, ctx, mask)
    model = dn.variant_model("mu", C, dropout=0.5)
    fn = _jit(
        lambda p, key: model.apply(
            {"params": p}, x, t, ctx, mask, deterministic=False, rngs={"dropout": key}
        )
    )
    a, b = fn(mu_params, jax.random.key(0)), fn(mu_params, jax.random.key(1))
    assert float(jnp.abs(a - b).max()) > 1e-3 and float(jnp.abs(a - ref).max()) > 1e-3
    bf16 = _fwd(dn.variant_model("mu", C, dtype=jnp.bfloat16), mu_params, x, t, ctx, mask)
    assert bf16.dtype == jnp.float32
    assert float(jnp.abs(bf16 - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_logical_partitioning_and_sharded_apply(mu_params):
    abstract = jax.eval_shape(MU.init, jax.random.key(1), *_inputs())
    specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract)["params"], sep="/")
    P = PartitionSpec
    expected = {
        "patch_embed/kernel": P(None, "embed"),
        "time_embed/fc1/kernel": P(None, "mlp"),
        "text_embed/fc2/kernel": P("mlp", "embed"),
        "block_0/attn/query/kernel": P("embed", "heads", "kv"),
        "block_0/attn/query/bias": P("heads", "kv"),
        "block_0/attn/q_norm/scale": P("kv"),
        "block_0/temporal_attn/out/kernel": P("heads", "kv", "embed"),
        "block_0/cross_attn/value/kernel": P("embed", "heads", "kv"),
        "block_0/cross_norm/scale": P("embed"),
        "block_0/mlp/fc1/kernel": P("embed", "mlp"),
        "block_0/mlp/fc2/kernel": P("mlp", "embed"),
        "block_0/attn_mod/linear/kernel": P("embed", "mlp"),
        "final_linear/kernel": P("embed", None),
    }
    for key, spec in expected.items():
        assert specs[key] == spec, key
    # Every parameter is annotated (an unannotated one would be silently replicated).
    leaves = jax.tree.leaves(abstract["params"], is_leaf=lambda a: isinstance(a, nn.Partitioned))
    assert all(isinstance(a, nn.Partitioned) for a in leaves)

    # Sharded apply on a (data 2, fsdp 2, sequence 1, tensor 2) mesh of fake devices with the base
    # config's rules: activation constraints are really emitted, and the output equals the 1-device
    # run. (Sequence parallelism: tests/test_sequence_parallel.py.)
    x, t, ctx, mask = _inputs()
    ref = _fwd(MU, mu_params, x, t, ctx, mask)
    rules = base.get_config().mesh.logical_axis_rules
    mesh = Mesh(
        np.asarray(jax.devices()[:8]).reshape(2, 2, 1, 2), ("data", "fsdp", "sequence", "tensor")
    )
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    # jax.set_mesh (not the deprecated `with mesh:`) is what activates flax's logical constraints.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # Init under an active mesh applies the param constraints too (vdm.train.state inits there).
        under_mesh = jax.eval_shape(MU.init, jax.random.key(1), *_inputs())
        params = jax.device_put(mu_params, shardings["params"])
        assert params["block_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        args = [jax.device_put(a, batch) for a in (x, t, ctx, mask)]
        fn = _jit(lambda p, *a: MU.apply({"params": p}, *a))
        lowered = fn.lower(params, *args)
        assert "sharding_constraint" in lowered.as_text()
        y = lowered.compile()(params, *args)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert _flat_shapes(under_mesh["params"]) == _flat_shapes(abstract["params"])


def test_rope_is_relative():
    # Rotating q and k by 3-D positions: dot products depend only on the position difference.
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 16)).astype(np.float32)

    @jax.jit
    def rotated(v):  # v rotated at every position of a 6x5x4 grid: [6, 5, 4, 16]
        grid = jnp.broadcast_to(v, (1, 6, 5, 4, 1, 16))
        return layers.apply_rope(grid, layers.rope_3d((6, 5, 4), 16))[0, :, :, :, 0]

    rq, rk = np.asarray(rotated(q)), np.asarray(rotated(k))

    def dot(pq, pk):
        return float(np.dot(rq[pq], rk[pk]))

    assert dot((1, 1, 0), (3, 2, 1)) == pytest.approx(dot((3, 2, 2), (5, 3, 3)), rel=1e-5)
    for other in [(4, 2, 1), (3, 3, 1), (3, 2, 2)]:  # a different offset along t, h or w
        assert dot((1, 1, 0), other) != pytest.approx(dot((1, 1, 0), (3, 2, 1)), rel=1e-3)


def test_multi_axis_linear_is_one_2d_matmul_on_cpu_with_the_same_values_and_grads():
    """On CPU `Linear` contracts as one 2-D matmul, leading axes flattened into rows, for an
    (embed, heads, kv) / (heads, kv, embed) kernel and for a plain kernel on a 5-D activation:
    values and grads equal the dot_general's, which every other platform keeps, and the compiled
    backward has no transposed copy (the weight gradient of a dot_general over several leading
    axes transposes a whole activation on XLA:CPU: issue #22)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 6)), jnp.float32)  # [..., heads=4, kv=6]
    kernel = jnp.asarray(rng.normal(size=(4, 6, 5, 2)), jnp.float32)  # (heads, kv) -> (5, 2)
    x5 = jnp.asarray(rng.normal(size=(2, 3, 2, 2, 8)), jnp.float32)  # [B, T, H, W, embed]
    k2 = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)

    def general(x, k, n_in):
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, k, (contract, ((), ())))

    def loss(fn):
        return lambda x, k: jnp.sum(jnp.sin(fn(x * 1.5, k)))

    for xs, k, n_in in ((x, kernel, 2), (x5, k2, 1)):
        cpu = functools.partial(layers._contract, n_in=n_in)
        ref = functools.partial(general, n_in=n_in)
        np.testing.assert_allclose(cpu(xs, k), ref(xs, k), rtol=1e-5, atol=1e-5)
        grads = jax.grad(loss(cpu), (0, 1))(xs, k), jax.grad(loss(ref), (0, 1))(xs, k)
        for a, b in zip(*grads, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        compiled = jax.jit(jax.grad(loss(cpu), (0, 1))).lower(xs, k).compile().as_text()
        assert " transpose(" not in compiled, n_in
        old = jax.jit(jax.grad(loss(ref), (0, 1))).lower(xs, k).compile().as_text()
        assert " transpose(" in old, n_in  # what the check above guards against
    hlo = jax.jit(jax.grad(loss(cpu), (0, 1))).lower(x5, k2).as_text()
    # forward x[48, 8] @ k[8, 16]; dx = dy @ k^T contracts the kernel's axis 1 in place.
    assert hlo.count("dot_general") == 3 and "contracting_dims = [1] x [1]" in hlo
    cpu = functools.partial(layers._contract, n_in=2)
    with A_target("tpu"):  # what an AOT compile for a TPU traces: the multi-axis dot_general
        tpu = jax.jit(cpu).lower(x, kernel).as_text()
    assert "contracting_dims = [2, 3] x [0, 1]" in tpu
