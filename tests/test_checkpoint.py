"""Checkpoint items (vdm.io.manager), restore onto another mesh, the loaders (vdm.io.checkpoint),
partial/corrupt steps, and config upgrades of saved configs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.toy_task import ToyTask, toy_config
from vdm import parallel
from vdm.io import checkpoint, manager
from vdm.train import state as train_state


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _save_steps(directory, steps, *, max_to_keep=0, value=1.0):
    mesh = parallel.make_mesh({"data": 8})
    w = jax.device_put(jnp.full((8, 4), value), NamedSharding(mesh, P("data")))
    with manager.CheckpointManager(directory, max_to_keep=max_to_keep) as m:
        for s in steps:
            m.save(s, arrays={"params": {"w": w * s}}, json_items={"config": {"step": s}})
    return w


def test_train_state_saved_on_one_mesh_restores_on_another(tmp_path):
    config = toy_config({"mesh.shape": {"data": 4, "fsdp": 2}})
    task = ToyTask(config)
    state, _ = train_state.create_train_state(task, config, parallel.make_mesh(config.mesh))
    with manager.CheckpointManager(str(tmp_path), async_save=True) as m:
        m.save(
            3,
            arrays={
                "params": state.params,
                "opt_state": {"step": state.step, "opt_state": state.opt_state},
            },
        )
    # Restore onto a data=2 x tensor=4 mesh: the `mlp` dim is now split 4 ways.
    other = toy_config({"mesh.shape": {"data": 2, "fsdp": 1, "tensor": 4}})
    abstract, _ = train_state.state_shardings(task, other, parallel.make_mesh(other.mesh))
    with manager.CheckpointManager(str(tmp_path)) as m:
        restored = m.restore(
            3,
            arrays={
                "params": abstract.params,
                "opt_state": {"step": abstract.step, "opt_state": abstract.opt_state},
            },
        )
    kernel = restored["params"]["fc1"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.sharding.mesh.shape["tensor"] == 4
    assert {s.data.shape for s in kernel.addressable_shards} == {(96, 8)}
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        restored["params"],
        state.params,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        restored["opt_state"]["opt_state"],
        state.opt_state,
    )
    # And onto a single device, as inference does.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = checkpoint.load_params(str(tmp_path / "3"), "params", sharding=one)
    assert params["fc1"]["kernel"].sharding == one
    np.testing.assert_array_equal(
        np.asarray(params["fc2"]["kernel"]), state.params["fc2"]["kernel"]
    )


def test_load_params_accepts_workdir_checkpoints_dir_and_step_dir(tmp_path):
    workdir = tmp_path / "run"
    w = _save_steps(manager.checkpoint_dir(str(workdir)), [1, 2])
    expected = 2 * np.asarray(w)
    for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "2"):
        # No "ema" item was written (EMA off): "ema" falls back to the raw params.
        params = checkpoint.load_params(str(path))
        np.testing.assert_array_equal(np.asarray(params["w"]), expected)
        assert params["w"].is_fully_replicated
    step1 = checkpoint.load_params(str(workdir / "checkpoints" / "1"), "params")
    np.testing.assert_array_equal(np.asarray(step1["w"]), np.asarray(w))
    assert checkpoint.load_config(str(workdir)).step == 2
    with pytest.raises(FileNotFoundError, match="no 'metadata' item"):
        checkpoint.load_metadata(str(workdir))


def test_missing_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere' does not exist.*training workdir"):
        checkpoint.load_params(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No checkpoint found at '.*empty': expected"):
        checkpoint.load_params(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="item must be 'ema' or 'params'"):
        checkpoint.load_params(str(tmp_path / "empty"), item="opt_state")


def test_json_and_data_iterator_items_round_trip(tmp_path):
    config = toy_config()
    metadata = {"shift": np.float32(0.5), "scale": np.arange(3, dtype=np.float32), "name": "vae"}
    with manager.CheckpointManager(str(tmp_path)) as m:
        m.save(
            1,
            arrays={"params": {"w": np.ones(2, np.float32)}},
            json_items={"config": config.to_dict(), "metadata": metadata},
            data_state=b'{"last_seen_indices": {"0": 7}}',  # grain's get_state(): JSON bytes
        )
        m.save(2, arrays={"params": {"w": np.ones(2, np.float32)}}, data_state={"next_index": 2})
        m.wait()
        assert m.restore(1, arrays={}, data=True)["data_iter"] == b'{"last_seen_indices": {"0": 7}}'
        assert m.restore(2, arrays={}, data=True)["data_iter"] == {"next_index": 2}
    loaded = checkpoint.load_config(str(tmp_path / "1"))
    assert loaded.mesh.logical_axis_rules == config.mesh.logical_axis_rules  # tuples again
    assert loaded.optim.learning_rate == config.optim.learning_rate
    assert checkpoint.load_metadata(str(tmp_path / "1")) == {
        "shift": 0.5,
        "scale": [0.0, 1.0, 2.0],
        "name": "vae",
    }
    files = os.listdir(tmp_path / "1" / "data_iter")
    assert "process_0-of-1.json" in files


# The deliberately failed read of the corrupt step may leave an orbax/tensorstore callback that
# fires after orbax closed its asyncio loop ("Event loop is closed"); harmless and not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_latest_ignores_partial_writes_and_moves_corrupt_steps_aside(tmp_path):
    d = str(tmp_path)
    w = _save_steps(d, [1, 2, 3])
    shutil.copytree(f"{d}/3", f"{d}/4.orbax-checkpoint-tmp")  # a save killed mid-write
    shutil.rmtree(f"{d}/3/params/d")  # a "finished" step whose array data is gone
    target = {"params": {"w": _abstract(w, w.sharding)}}
    with manager.CheckpointManager(d) as m:
        assert m.all_steps() == [1, 2, 3]
        step, restored = m.restore_latest(arrays=target)
        assert step == 2
        np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), 2 * np.asarray(w))
        assert m.all_steps() == [1, 2]
        assert os.path.isdir(f"{d}/3.corrupt")
        m.save(3, arrays={"params": {"w": w}})  # the step can be written again
        m.wait()
        assert m.latest_step() == 3


def test_restore_latest_moves_nothing_when_no_step_fits(tmp_path):
    d = str(tmp_path)
    _save_steps(d, [1, 2])
    mesh = parallel.make_mesh({"data": 8})
    wrong = {
        "params": {
            "w": jax.ShapeDtypeStruct((3, 3), jnp.float32, sharding=parallel.replicated(mesh))
        }
    }
    with manager.CheckpointManager(d) as m:
        with pytest.raises(ValueError, match=r"Cannot resume from .*none of its steps \[1, 2\]"):
            m.restore_latest(arrays=wrong)
        assert m.all_steps() == [1, 2]
        assert m.restore_latest(arrays={})[0] == 2
    assert manager.CheckpointManager(str(tmp_path / "fresh")).restore_latest(arrays={}) == (
        None,
        None,
    )


def test_max_to_keep_keeps_the_newest(tmp_path):
    _save_steps(str(tmp_path), [1, 2, 3, 4, 5], max_to_keep=2)
    assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [4, 5]
    with open(tmp_path / "5" / "config" / "metadata") as f:
        assert json.load(f) == {"step": 5}


def test_saved_configs_are_upgraded_to_the_current_schema(tmp_path):
    """A config saved before fields were added (version 0) reads back with them at their
    defaults, so an old checkpoint takes the same overrides as a new one."""
    from ml_collections import ConfigDict

    from vdm import config as config_lib
    from vdm.errors import ConfigError

    old = toy_config().to_dict()
    assert old.pop("version") == config_lib.CONFIG_VERSION  # configs/base.py records the schema
    old.setdefault("sample", {"guidance": 3.0})
    old["sample"].pop("shift", None)
    old.setdefault("train", {}).pop("init_from", None)
    with manager.CheckpointManager(str(tmp_path)) as m:
        m.save(1, arrays={"params": {"w": np.ones(2, np.float32)}}, json_items={"config": old})
    loaded = checkpoint.load_config(str(tmp_path))
    assert loaded.sample.shift is None and loaded.train.init_from == ""
    assert loaded.version == config_lib.CONFIG_VERSION
    config_lib.apply_override(loaded, "sample.shift", "1.5")  # typed: a float placeholder
    assert loaded.sample.shift == 1.5
    with pytest.raises(ConfigError, match="version 99"):
        config_lib.upgrade(ConfigDict({"version": 99}))


def test_interrupted_reads_leave_no_event_loop_tracebacks(monkeypatch):
    """What an interrupted orbax read leaves behind (callbacks into a closed loop, a loop
    interrupted mid-construction) is dropped; any other unraisable error still reaches the hook."""
    import types

    seen = []
    monkeypatch.setattr(manager, "_previous_unraisablehook", seen.append)
    monkeypatch.delenv("VDM_TRACEBACK", raising=False)
    late = [
        RuntimeError("Event loop is closed"),
        AttributeError("'_UnixSelectorEventLoop' object has no attribute '_ssock'"),
    ]
    for e in late:
        manager._quiet_closed_loop(types.SimpleNamespace(exc_value=e))
    assert seen == []
    other = types.SimpleNamespace(exc_value=AttributeError("'Foo' object has no attribute 'x'"))
    manager._quiet_closed_loop(other)
    assert seen == [other]
    monkeypatch.setenv("VDM_TRACEBACK", "1")
    manager._quiet_closed_loop(types.SimpleNamespace(exc_value=late[1]))
    assert len(seen) == 2
