"""Mesh construction, logical-axis shardings, batch sharding and pmap layout (8 fake devices)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.toy_task import ToyTask, toy_config
from vdm import parallel
from vdm.parallel import pmap as pmap_layout
from vdm.rng import base_key
from vdm.train import setup as train_setup
from vdm.train.state import create_train_state


def test_mesh_shape_fills_and_rejects_bad_shapes():
    assert parallel.mesh_shape({"data": -1, "fsdp": 2}, 8) == {
        "data": 4,
        "fsdp": 2,
        "sequence": 1,
        "tensor": 1,
    }
    assert parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8)["tensor"] == 2
    with pytest.raises(ValueError, match=r"has 3 devices .* but 8 are available"):
        parallel.mesh_shape({"data": 3}, 8)
    with pytest.raises(ValueError, match=r"multiply to 3, which does not divide the 8 devices"):
        parallel.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        parallel.mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_make_mesh_axes_and_device_subsets():
    mesh = parallel.make_mesh(toy_config({"mesh.shape": {"data": 4, "fsdp": 2}}).mesh)
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "sequence": 1, "tensor": 1}
    one = parallel.make_mesh({"data": -1}, devices=jax.devices()[:1])
    assert one.size == 1
    assert "data=4 fsdp=2 sequence=1 tensor=1 (8 devices" in parallel.describe_mesh(mesh)


def test_logical_rules_map_params_and_fall_back_on_indivisible_dims(caplog):
    config = toy_config({"mesh.shape": {"data": 2, "fsdp": 2, "tensor": 2}})
    mesh = parallel.make_mesh(config.mesh)
    task = ToyTask(config)
    boxed = jax.eval_shape(task.init, base_key(0), task.dummy_batch(1))
    with caplog.at_level(logging.WARNING, logger="vdm.parallel"):
        shardings = parallel.logical_to_sharding(boxed, mesh, config.mesh.logical_axis_rules)
    assert shardings["fc1"]["kernel"].spec == P("fsdp", "tensor")  # (embed, mlp)
    assert shardings["fc2"]["kernel"].spec == P("tensor", "fsdp")  # (mlp, embed)
    assert shardings["fc1"]["bias"].spec == P("tensor")
    assert shardings["gain"].spec == P()  # unboxed -> replicated
    assert shardings["odd"].spec == P()  # 3 over fsdp=2 -> replicated, with a warning
    assert "['odd'] dim 0 (3 over fsdp=2)" in caplog.text


def test_state_is_created_sharded_by_the_rules():
    config = toy_config({"mesh.shape": {"data": 4, "fsdp": 2}})
    mesh = parallel.make_mesh(config.mesh)
    state, shardings = create_train_state(ToyTask(config), config, mesh)
    kernel = state.params["fc1"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(48, 32)}  # 96 rows over fsdp=2
    mu = state.opt_state[1][0].mu["fc1"]["kernel"]  # AdamW moment: same layout as the param
    assert mu.sharding.spec == P("fsdp", "tensor")
    assert state.ema_params["fc2"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert state.step.sharding.spec == P()
    assert shardings.params["fc1"]["kernel"] == kernel.sharding


def test_shard_batch_splits_over_data_and_fsdp():
    mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
    batch = {"video": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    out = parallel.shard_batch(batch, mesh)["video"]
    assert out.shape == (16, 3)
    assert out.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(out), batch["video"])
    parallel.check_batch_size(16, mesh)
    with pytest.raises(ValueError, match=r"batch_size=12 does not divide .* data x fsdp = 8"):
        parallel.check_batch_size(12, mesh)


def test_activation_constraints_reach_the_compiled_step():
    config = toy_config({"mesh.shape": {"data": 4, "fsdp": 2}})
    mesh = parallel.make_mesh(config.mesh)
    task = ToyTask(config)
    setup = train_setup.build(task, config, mesh)
    state = train_setup.init_state(setup)
    frozen = train_setup.place_frozen(setup)
    # Frozen weights are a sharded argument of the step (boxed "embed" -> fsdp), not a constant.
    assert frozen["shift"].sharding.spec == P("fsdp")
    step = setup.train_step
    batch = parallel.shard_batch(task.device_batch(task.dummy_batch(8)), mesh)
    text = step.lower(state, batch, base_key(0), frozen).as_text()
    # ("batch", "mlp") on the hidden activation -> data+fsdp on dim 0.
    assert "sharding_constraint %" in text and '[{"data", "fsdp"}, {"tensor"}]' in text


def test_pmap_layout_round_trip():
    mesh = parallel.make_mesh({"data": -1})
    tree = {"w": jax.device_put(jnp.arange(6.0).reshape(2, 3), parallel.replicated(mesh))}
    stacked = pmap_layout.to_replicated(tree)
    assert stacked["w"].shape == (8, 2, 3)
    assert {s.data.shape for s in stacked["w"].addressable_shards} == {(1, 2, 3)}
    summed = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")(stacked["w"])
    np.testing.assert_array_equal(np.asarray(summed[3]), 8 * np.arange(6.0).reshape(2, 3))
    back = pmap_layout.from_replicated(stacked, mesh)
    assert back["w"].shape == (2, 3) and back["w"].is_fully_replicated
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(tree["w"]))
    host = pmap_layout.to_replicated({"b": np.ones(3, np.float32)})  # host arrays too
    assert host["b"].shape == (8, 3)
    assert pmap_layout.shard_batch({"x": np.zeros((16, 2))}, 8)["x"].shape == (8, 2, 2)
    with pytest.raises(ValueError, match="does not divide over 8 local devices"):
        pmap_layout.shard_batch({"x": np.zeros((12, 2))}, 8)


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    with pytest.raises(ValueError, match="needs both num_processes"):
        parallel.initialize_distributed("127.0.0.1:1234")


def test_logical_to_mesh_spec_allows_repeated_names_and_uses_each_mesh_axis_once():
    rules = toy_config().mesh.logical_axis_rules
    conv = ("kernel", "kernel", "kernel", "conv_in", "conv_out")  # a 3D conv kernel
    assert parallel.logical_to_mesh_spec(conv, rules) == P(None, None, None, None, "fsdp")
    # ("embed", "fsdp") and ("conv_out", "fsdp") both match: fsdp shards only the first in rule
    # order; an unknown name stays replicated.
    assert parallel.logical_to_mesh_spec(("conv_out", "embed", "what"), rules) == P(
        None, "fsdp", None
    )
    assert parallel.logical_to_mesh_spec(("batch", "mlp"), rules) == P(("data", "fsdp"), "tensor")
    assert parallel.logical_to_mesh_spec(("embed", "batch"), rules) == P(None, ("data", "fsdp"))
