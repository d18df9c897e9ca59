"""LoRA fine-tuning (vdm.models.lora, vdm.tasks.lora): adapters equal the base at init, only
adapters train, checkpoints hold adapters only and resume bit-exactly, export merges."""

import glob
import os
import shutil

import flax
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from toy_task import ToyTask, iterator_factory, make_examples, toy_config

from vdm import parallel
from vdm.config import load_config
from vdm.errors import ConfigError
from vdm.io import checkpoint as ckpt_lib
from vdm.models import denoiser as dn
from vdm.models import lora
from vdm.models.layers import count_params
from vdm.tasks import lora as lora_task
from vdm.train import loop

TOY_LORA = {"optim.lora_rank": 4, "optim.lora_targets": "fc[12]/kernel$", "optim.ema_decay": 0.0}


def tiny_denoiser():
    config = load_config(
        "configs/base.py", {"model.depth": 1, "model.width": 32, "model.num_heads": 2}
    )
    model = dn.Denoiser.from_config(config.model, 4)
    # Tokens and text tokens that differ (with identical ones attention's q and k do nothing).
    z, ctx = (
        jax.random.normal(jax.random.key(i), s) for i, s in ((3, (1, 2, 4, 4, 4)), (4, (1, 5, 384)))
    )
    t, mask = jnp.full((1,), 0.3), jnp.ones((1, 5), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.key(0), z, t, ctx, mask)["params"]
    forward = jax.jit(lambda p: model.apply({"params": p}, z, t, ctx, mask))
    init = lambda key: model.init(key, z, t, ctx, mask)["params"]  # noqa: E731
    # adaLN-Zero makes a fresh denoiser output 0: perturb every weight to get a real function.
    leaves, tree = jax.tree.flatten(parallel.unbox(boxed))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(tree, params)
    assert float(jnp.abs(forward(params)).mean()) > 1e-3
    return boxed, params, forward, init


def test_adapters_start_as_the_base_and_shard_like_their_kernels():
    boxed, params, forward, _ = tiny_denoiser()
    adapters = lora.init_adapters(jax.random.key(1), boxed, 4, "")
    flat = flax.traverse_util.flatten_dict(adapters, sep="/")
    paths = {k.rsplit("/", 1)[0] for k in flat}
    # Default targets: q/k/v/out of the three attentions and both MLP projections, nothing else.
    assert len(paths) == 3 * 4 + 2 and "block_0/cross_attn/out/kernel" in paths
    assert not any("mod" in p or "embed" in p or "final" in p for p in paths)
    q, o = "block_0/attn/query/kernel", "block_0/attn/out/kernel"
    assert flat[f"{q}/lora_a"].names == ("embed", None)  # A [in, r]: like the kernel's input
    assert flat[f"{q}/lora_b"].names == (None, "heads", "kv")  # B [r, out]: like its output
    assert flat[f"{o}/lora_a"].value.shape == (2, 16, 4)  # out kernel [heads, kv, embed]
    assert flat[f"{o}/lora_b"].value.shape == (4, 32)
    merged = lora.apply(params, parallel.unbox(adapters), 2.0)
    jax.tree.map(np.testing.assert_array_equal, merged, params)  # B = 0: bit for bit the base
    np.testing.assert_array_equal(forward(merged), forward(params))


def test_apply_is_the_flattened_low_rank_product():
    boxed, params, forward, _ = tiny_denoiser()
    adapters = parallel.unbox(lora.init_adapters(jax.random.key(1), boxed, 3, "query/kernel$"))
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # a nonzero B
    merged = lora.apply(params, adapters, 0.5)
    pair = adapters["block_0"]["attn"]["query"]["kernel"]
    w = params["block_0"]["attn"]["query"]["kernel"]
    a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"]).reshape(3, -1)
    want = np.asarray(w).reshape(32, -1) + 0.5 * a @ b
    got = np.asarray(merged["block_0"]["attn"]["query"]["kernel"]).reshape(32, -1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(forward(merged), forward(params))
    untouched = merged["block_0"]["attn"]["key"]["kernel"]
    np.testing.assert_array_equal(untouched, params["block_0"]["attn"]["key"]["kernel"])


def _dot_shapes(jaxpr) -> set:
    """Output shapes of every dot_general in `jaxpr` and its sub-jaxprs (remat, pjit, ...)."""
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.add(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes |= _dot_shapes(sub)
    return shapes


def test_attached_adapters_are_the_merged_model_without_a_kernel_sized_tensor():
    boxed, params, forward, init = tiny_denoiser()
    abstract, paths = lora.linear_targets(init, "", jax.random.key(0))
    assert jax.tree.structure(abstract) == jax.tree.structure(boxed)
    # Every default target of the denoiser is a Linear's kernel, so none is merged in training.
    assert sorted(paths) == lora.targeted(boxed, "") and len(paths) == 14
    adapters = parallel.unbox(lora.init_adapters(jax.random.key(1), boxed, 3, ""))
    at_init = forward(lora.attach(params, adapters, 0.5, paths))
    np.testing.assert_array_equal(at_init, forward(params))  # B = 0: x W + (x A) 0 is x W
    keys = iter(jax.random.split(jax.random.key(5), 64))
    adapters = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), adapters)

    def loss(form):
        return lambda ad: jnp.mean(forward(form(ad)) ** 2)

    attached = loss(lambda ad: lora.attach(params, ad, 0.5, paths))
    merged = loss(lambda ad: lora.apply(params, ad, 0.5))
    np.testing.assert_allclose(attached(adapters), merged(adapters), rtol=1e-5)
    assert not np.isclose(merged(adapters), jnp.mean(forward(params) ** 2), rtol=1e-3)
    g_att, g_mer = jax.grad(attached)(adapters), jax.grad(merged)(adapters)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_att, g_mer)
    # No matmul makes a kernel-sized array (W + s A B, or its gradient): the merged form does.
    flat = flax.traverse_util.flatten_dict(boxed, sep="/")
    kernel_shapes = set()
    for path in paths:
        shape = flat[path].value.shape
        k = lora.num_in_axes(len(shape), tuple(flat[path].names))
        m, n = int(np.prod(shape[:k])), int(np.prod(shape[k:]))
        kernel_shapes |= {shape, (m, n), (n, m)}
    assert not _dot_shapes(jax.make_jaxpr(jax.grad(attached))(adapters).jaxpr) & kernel_shapes
    assert _dot_shapes(jax.make_jaxpr(jax.grad(merged))(adapters).jaxpr) & kernel_shapes
    # A kernel that is not a Linear's (here: named by path only) is merged by attach instead.
    q = "block_0/attn/query/kernel"
    partly = lora.attach(params, adapters, 0.5, [p for p in paths if p != q])
    assert "lora_a" not in partly["block_0"]["attn"]["query"]
    np.testing.assert_allclose(
        partly["block_0"]["attn"]["query"]["kernel"],
        lora.apply(params, adapters, 0.5)["block_0"]["attn"]["query"]["kernel"],
    )
    np.testing.assert_allclose(
        forward(partly), forward(lora.apply(params, adapters, 0.5)), rtol=1e-4, atol=1e-5
    )


def train(config, workdir):
    task = ToyTask(config)  # the loop wraps it when optim.lora_rank > 0
    return jax.device_get(
        loop.train_and_evaluate(config, workdir, task=task, make_iterator=iterator_factory())
    )


def losses(workdir):
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


def heldout_mse(params):
    task = ToyTask(toy_config())
    batch = {"video": make_examples(0, 10_000, 64), "scale": np.ones((64,), np.float32)}
    frozen = {"shift": np.linspace(-0.1, 0.1, 96, dtype=np.float32)}
    return float(task.per_example_loss(params, frozen, batch, jax.random.key(0)).mean())


def dir_size(path):
    return sum(
        os.path.getsize(f) for f in glob.glob(f"{path}/**", recursive=True) if os.path.isfile(f)
    )


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("lora") / "base")
    train(toy_config({"optim.ema_decay": 0.0}), base)
    return base


def test_lora_trains_adapters_only_and_resumes_bit_exactly(base_run, tmp_path, capsys):
    base_params = ckpt_lib.load_params(base_run)
    overrides = {
        **TOY_LORA,
        "train.init_from": base_run,
        "train.num_steps": 12,
        "train.log_every_steps": 1,
        "checkpoint.every_steps": 6,
        "checkpoint.async_save": False,
        "optim.learning_rate": 3e-2,
        "optim.decay": "constant",
    }
    config = toy_config(overrides)
    work = str(tmp_path / "tune")
    state = train(config, work)
    assert "LoraTask: 1,024 trainable parameters, 6,372 frozen" in capsys.readouterr().out
    assert lora_task.wrap(ToyTask(config), config).unmerged == []  # nn.Dense: merged in the step
    # Only adapters in the state: A and B of fc1 (96x32) and fc2 (32x96) at rank 4.
    assert count_params(state.params) == 4 * 2 * (96 + 32)
    assert set(flax.traverse_util.flatten_dict(state.params, sep="/")) == {
        "fc1/kernel/lora_a", "fc1/kernel/lora_b", "fc2/kernel/lora_a", "fc2/kernel/lora_b"
    }  # fmt: skip
    # The held-out loss (fixed examples and noise) of the merged weights falls below the base's.
    tuned = heldout_mse(lora.merge(base_params, state.params, config.optim))
    assert tuned < heldout_mse(base_params) - 0.005, (tuned, heldout_mse(base_params))
    assert all(np.isfinite(losses(work)))
    # The base on disk is untouched and the checkpoint references it, much smaller than it.
    jax.tree.map(np.testing.assert_array_equal, ckpt_lib.load_params(base_run), base_params)
    meta = ckpt_lib.load_metadata(work)
    assert meta["lora"]["base"] == os.path.abspath(base_run) and meta["lora"]["rank"] == 4
    step_dir = os.path.join(work, "checkpoints", "12")
    # The checkpoint stores the adapters, not the weights: its params item restores to the 1,024
    # adapter values (the base's to all its weights), and it is smaller on disk. At this toy
    # size orbax's per-array overhead dominates the bytes; a real model's ratio is ~ r / width.
    base_dir = os.path.join(base_run, "checkpoints", "8")
    assert count_params(ckpt_lib.load_params(step_dir, item="params")) == 1024
    assert count_params(ckpt_lib.load_params(base_dir, item="params")) == count_params(base_params)
    assert 0 < dir_size(step_dir) < dir_size(base_dir)
    # Resume: drop the last checkpoint; steps 7..12 again from step 6 give the same bits.
    shutil.rmtree(step_dir)
    again = train(config, work)
    jax.tree.map(np.testing.assert_array_equal, again.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, again.opt_state, state.opt_state)
    # A LoRA run is not a base for another (its checkpoints hold adapters only).
    chained = toy_config({**TOY_LORA, "train.init_from": work})
    with pytest.raises(ConfigError, match="is itself a LoRA run"):
        lora_task.wrap(ToyTask(chained), chained).frozen()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.lora_rank": -1}, "optim.lora_rank=-1 must not be negative"),
        ({"optim.lora_rank": 2}, "set train.init_from"),
        ({**TOY_LORA, "train.init_from": "X", "optim.freeze": "^fc1/"}, "optim.freeze cannot"),
        ({**TOY_LORA, "train.init_from": "X", "optim.lora_targets": "nope"}, "matches no kernel"),
        ({**TOY_LORA, "train.init_from": "X", "optim.lora_targets": "("}, "not a valid regular"),
    ],
)
def test_bad_lora_configs_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config = toy_config(overrides)
        lora_task.wrap(ToyTask(config), config)


def test_missing_base_is_a_config_error(tmp_path):
    config = toy_config({**TOY_LORA, "train.init_from": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="the LoRA base"):
        train(config, str(tmp_path / "w"))
