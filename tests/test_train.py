"""The shared training loop on a toy task: device-count invariance, pmap == jit, accumulation,
exact resume after SIGKILL, partial checkpoints, SIGTERM, NaN, and a 2-process jax.distributed run.

All on fake CPU devices (conftest: 8). Subprocess tests run `tests/toy_task.py` with timeouts.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.toy_task import ToyIterator, ToyTask, finish, iterator_factory, toy_config
from vdm import parallel
from vdm.errors import ConfigError
from vdm.io import checkpoint as ckpt_lib
from vdm.io import manager
from vdm.models.layers import count_params
from vdm.parallel import pmap as pmap_layout
from vdm.rng import base_key
from vdm.train import loop, optim
from vdm.train import setup as train_setup
from vdm.train.step import step_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MAIN = os.path.join(ROOT, "tests", "toy_task.py")


def run_steps(config, n, *, devices=None, task=None):
    """n train steps through the public pieces (no loop, no checkpoints): (losses, host state)."""
    task = task or ToyTask(config)
    setup = train_setup.build(task, config, parallel.make_mesh(config.mesh, devices))
    state = setup.layout.put_state(train_setup.init_state(setup))
    frozen = train_setup.place_frozen(setup)
    it = ToyIterator(
        batch_size=config.train.batch_size, seed=config.seed, process_index=0, process_count=1
    )
    losses, metrics = [], None
    for _ in range(n):
        batch = setup.layout.put_batch(task.device_batch(next(it)))
        state, metrics = setup.train_step(state, batch, base_key(config.seed), frozen)
        losses.append(setup.layout.fetch(metrics)["loss"])
    state = setup.layout.global_view(state)
    return np.array(losses), jax.device_get(state), setup.layout.fetch(metrics)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_8_devices_match_1_device_and_fsdp_matches_too():
    ref_losses, ref, metrics = run_steps(
        toy_config({"mesh.shape": {"data": 1}}), 4, devices=jax.devices()[:1]
    )
    assert ref_losses[-1] < ref_losses[0]  # it learns
    assert set(metrics) >= {
        "loss",
        "max_example_loss",
        "grad_norm",
        "param_norm",
        "update_norm",
        "learning_rate",
    }
    for shape in ({"data": 8}, {"data": 4, "fsdp": 2}):
        losses, state, _ = run_steps(toy_config({"mesh.shape": shape}), 4)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert_trees_close(state.params, ref.params)
        assert_trees_close(state.ema_params, ref.ema_params)


def test_pmap_path_equals_jit_path():
    overrides = {"mesh.shape": {"data": 8}}
    jit_losses, jit_state, _ = run_steps(toy_config(overrides), 3, task=ToyTask(None, noise=False))
    config = toy_config({**overrides, "parallel": "pmap"})
    pmap_losses, pmap_state, _ = run_steps(config, 3, task=ToyTask(config, noise=False))
    np.testing.assert_allclose(pmap_losses, jit_losses, rtol=1e-5)
    assert_trees_close(pmap_state.params, jit_state.params)
    assert_trees_close(pmap_state.opt_state, jit_state.opt_state)


def test_pmap_step_keys_differ_per_device_and_per_step():
    fold = jax.pmap(
        lambda s: jax.random.key_data(step_key(base_key(0), s, pmap_layout.AXIS)),
        axis_name=pmap_layout.AXIS,
    )
    keys = np.asarray(fold(np.zeros(8, np.int32)))
    assert len({k.tobytes() for k in keys}) == 8  # never the same noise on every device
    later = np.asarray(fold(np.ones(8, np.int32)))
    assert not np.array_equal(keys, later)
    jit_key = jax.random.key_data(step_key(base_key(0), 3))
    assert np.array_equal(jit_key, jax.random.key_data(jax.random.fold_in(base_key(0), 3)))


def test_gradient_accumulation_equals_one_big_batch():
    common = {"mesh.shape": {"data": 4}, "optim.warmup_steps": 0, "optim.decay": "constant"}
    devices = jax.devices()[:4]
    big = toy_config({**common, "train.batch_size": 8})
    _, big_state, _ = run_steps(big, 1, devices=devices, task=ToyTask(big, noise=False))
    acc = toy_config({**common, "train.batch_size": 4, "optim.accumulate_steps": 2})
    _, acc_state, m = run_steps(acc, 2, devices=devices, task=ToyTask(acc, noise=False))
    assert_trees_close(acc_state.params, big_state.params)
    assert_trees_close(acc_state.ema_params, big_state.ema_params)
    assert m["learning_rate"] == pytest.approx(1e-2)


def test_learning_rate_schedule_warmup_and_cosine():
    config = toy_config({"optim.warmup_steps": 4, "train.num_steps": 20})
    schedule = optim.learning_rate_schedule(config.optim, 20)
    assert float(schedule(0)) == 0.0
    assert float(schedule(4)) == pytest.approx(1e-2)
    assert float(schedule(20)) == pytest.approx(1e-3)  # end_lr_factor 0.1
    assert float(schedule(2)) == pytest.approx(5e-3)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_and_evaluate_logs_evaluates_and_checkpoints(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    config = toy_config({"train.eval_every_steps": 4})
    task = ToyTask(config)
    state = loop.train_and_evaluate(config, workdir, task=task, make_iterator=iterator_factory())
    out = capsys.readouterr().out
    assert "6,276 trainable parameters, 96 frozen; mesh data=8 fsdp=1 sequence=1 tensor=1" in out
    assert int(state.step) == 8
    assert [s for s, _ in task.eval_calls] == [4, 8]
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    last = train_rows[-1]
    assert last["perf/tokens_per_sec"] == pytest.approx(last["perf/videos_per_sec"] * 32)
    assert last["perf/videos_per_sec"] == pytest.approx(last["perf/steps_per_sec"] * 8)
    eval_rows = [r for r in rows if "eval/mse" in r]
    assert [r["step"] for r in eval_rows] == [4, 8]
    assert eval_rows[-1]["eval/mse"] == pytest.approx(task.eval_calls[-1][1])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{workdir}/tensorboard"))
    assert sorted(os.listdir(manager.checkpoint_dir(workdir))) == ["4", "8"]
    ema = ckpt_lib.load_params(workdir)  # what sampling uses
    assert_trees_equal(ema, jax.device_get(state.ema_params))
    assert ckpt_lib.load_metadata(workdir)["toy"] is True
    assert ckpt_lib.load_config(workdir).train.num_steps == 8


def test_init_from_and_freeze_fine_tune_part_of_a_trained_model(tmp_path, capsys):
    """`train.init_from` starts from another run's EMA weights; `optim.freeze` holds the matching
    parameters bit-identical (params and EMA) with no optimizer moments, the rest trains."""
    base_dir, tune_dir = str(tmp_path / "base"), str(tmp_path / "tune")
    loop.train_and_evaluate(
        toy_config(), base_dir, task=ToyTask(toy_config()), make_iterator=iterator_factory()
    )
    base = ckpt_lib.load_params(base_dir)
    config = toy_config(
        {"train.init_from": base_dir, "optim.freeze": "^fc1/", "train.eval_every_steps": 0}
    )
    state = jax.device_get(
        loop.train_and_evaluate(
            config, tune_dir, task=ToyTask(config), make_iterator=iterator_factory()
        )
    )
    out = capsys.readouterr().out
    assert "6,276 trainable parameters" in out  # the base run
    assert "3,172 trainable parameters, 3,104 held by optim.freeze='^fc1/'" in out
    assert f"Initialised the parameters from {base_dir} (step 8, EMA weights)" in out
    assert int(state.step) == 8
    assert_trees_equal(state.params["fc1"], base["fc1"])
    assert_trees_equal(state.ema_params["fc1"], base["fc1"])
    assert not np.array_equal(state.params["fc2"]["kernel"], base["fc2"]["kernel"])
    assert not np.array_equal(state.ema_params["fc2"]["kernel"], base["fc2"]["kernel"])
    # AdamW moments (mu, nu) for the 3,172 trainable values only, plus step counters.
    assert 2 * 3172 <= count_params(state.opt_state) < 2 * 3172 + 8

    # Resuming the fine-tune ignores init_from (its own checkpoint wins) and says so.
    config = toy_config(
        {"train.init_from": base_dir, "optim.freeze": "^fc1/", "train.num_steps": 10}
    )
    loop.train_and_evaluate(
        config, tune_dir, task=ToyTask(config), make_iterator=iterator_factory()
    )
    assert "train.init_from is ignored" in capsys.readouterr().out


def test_init_from_and_freeze_errors_name_the_problem(tmp_path):
    base_dir = str(tmp_path / "base")
    config = toy_config({"train.num_steps": 2})
    loop.train_and_evaluate(
        config, base_dir, task=ToyTask(config), make_iterator=iterator_factory()
    )
    other = toy_config({"train.init_from": base_dir})
    with pytest.raises(ConfigError, match=r"fc1/kernel: checkpoint \(96, 32\) vs model \(96, 16\)"):
        loop.train_and_evaluate(
            other,
            str(tmp_path / "a"),
            task=ToyTask(other, hidden=16),
            make_iterator=iterator_factory(),
        )
    missing = toy_config({"train.init_from": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="train.init_from=.*nowhere.*does not exist"):
        loop.train_and_evaluate(
            missing, str(tmp_path / "b"), task=ToyTask(missing), make_iterator=iterator_factory()
        )
    for pattern, message in (
        ("^encoder/", r"matches no parameter.*\['fc1/bias', 'fc1/kernel', 'fc2/bias'"),
        (".", "matches every parameter, so nothing would train"),
        ("fc1/(", "not a valid regular expression"),
    ):
        config = toy_config({"optim.freeze": pattern})
        with pytest.raises(ConfigError, match=message):
            loop.train_and_evaluate(
                config, str(tmp_path / "c"), task=ToyTask(config), make_iterator=iterator_factory()
            )


def test_evaluation_waits_for_the_checkpoint_of_its_step(tmp_path, monkeypatch):
    """An async save must not overlap evaluation (its first-use imports break orbax's writer
    threads, see vdm.train.hooks.Evaluator), so the loop waits for the save of the same step."""
    events = []
    wait = manager.CheckpointManager.wait
    monkeypatch.setattr(
        manager.CheckpointManager, "wait", lambda self: (events.append("wait"), wait(self))[1]
    )
    config = toy_config({"train.eval_every_steps": 4, "checkpoint.every_steps": 4})
    task = ToyTask(config)
    evaluate = task.evaluate
    task.evaluate = lambda *a: (events.append(f"eval {a[2]}"), evaluate(*a))[1]
    loop.train_and_evaluate(
        config, str(tmp_path / "run"), task=task, make_iterator=iterator_factory()
    )
    assert events[:4] == ["wait", "eval 4", "wait", "eval 8"]


def toy_run(workdir, *args, devices=8, env=None):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, TOY_MAIN, "--workdir", workdir, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_and_restart_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # Reference: uninterrupted, in this process (same 8 devices, same compiled program).
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    config = toy_config({"train.num_steps": 12})
    loop.train_and_evaluate(config, ref_dir, task=ToyTask(config), make_iterator=iterator_factory())
    # Killed with SIGKILL while fetching batch 10 (after checkpoints 4 and 8 were started).
    code, out = finish(toy_run(run_dir, "--set", "train.num_steps=12", "--kill_at", "10"))
    assert code == -signal.SIGKILL, out[-2000:]
    left = os.listdir(manager.checkpoint_dir(run_dir))
    assert "4" in left, left  # step 8 may be complete or still a *.orbax-checkpoint-tmp dir
    code, out = finish(toy_run(run_dir, "--set", "train.num_steps=12"))
    assert code == 0, out[-3000:]
    assert "Resumed from step" in out
    for item in ("params", "ema"):
        assert_trees_equal(ckpt_lib.load_params(run_dir, item), ckpt_lib.load_params(ref_dir, item))
    # Lines the killed run logged after its last checkpoint were dropped, then logged again.
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]


# The deliberately failed read of the corrupt step leaves an orbax/tensorstore callback that fires
# after orbax closed its asyncio loop ("Event loop is closed"); harmless and not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_partial_and_corrupt_latest_checkpoints_fall_back(tmp_path):
    ref_dir = str(tmp_path / "ref")
    config = toy_config({"train.num_steps": 8, "checkpoint.async_save": False})
    loop.train_and_evaluate(config, ref_dir, task=ToyTask(config), make_iterator=iterator_factory())
    ref_params = ckpt_lib.load_params(ref_dir, "params")
    ckpts = manager.checkpoint_dir(ref_dir)
    # 1) A save killed mid-write leaves `<step>.orbax-checkpoint-tmp`: never listed as a step.
    shutil.copytree(f"{ckpts}/8", f"{ckpts}/12.orbax-checkpoint-tmp")
    shutil.rmtree(f"{ckpts}/12.orbax-checkpoint-tmp/params")
    assert ckpt_lib.resolve(ref_dir)[1] == 8
    # 2) A finished-looking step 8 whose arrays are gone: restore falls back to 4, moves 8 aside,
    # and the resumed run recomputes step 8 bit-identically.
    shutil.rmtree(f"{ckpts}/8/params/d")
    state = loop.train_and_evaluate(
        config, ref_dir, task=ToyTask(config), make_iterator=iterator_factory()
    )
    assert int(state.step) == 8
    assert os.path.isdir(f"{ckpts}/8.corrupt")
    assert_trees_equal(ckpt_lib.load_params(ref_dir, "params"), ref_params)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    workdir = str(tmp_path / "run")
    # (EMA off here: the state has no EMA item and load_params("ema") falls back to params.)
    config = toy_config(
        {"train.num_steps": 100, "checkpoint.every_steps": 1000, "optim.ema_decay": 0.0}
    )
    previous = signal.getsignal(signal.SIGTERM)
    # The iterator sends SIGTERM to this process while fetching batch 5; step 6 completes, then
    # the loop saves step 6 and returns.
    state = loop.train_and_evaluate(
        config, workdir, task=ToyTask(config), make_iterator=iterator_factory(term_at=5)
    )
    assert int(state.step) == 6 and state.ema_params is None
    assert sorted(os.listdir(manager.checkpoint_dir(workdir))) == ["6"]
    assert_trees_equal(ckpt_lib.load_params(workdir, "ema"), jax.device_get(state.params))
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    state_file = os.path.join(
        manager.checkpoint_dir(workdir), "6", "data_iter", "process_0-of-1.json"
    )
    with open(state_file) as f:
        assert json.loads(json.loads(f.read())["state"]) == {"next_index": 6}


def test_nan_loss_stops_with_a_clear_message_and_saves_nothing_after_it(tmp_path):
    workdir = str(tmp_path / "run")
    config = toy_config(
        {"train.num_steps": 10, "checkpoint.every_steps": 2, "train.log_every_steps": 5}
    )
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite loss=nan.* at step 6 .*"
        r"last good checkpoint is step 4",
    ):
        loop.train_and_evaluate(
            config, workdir, task=ToyTask(config), make_iterator=iterator_factory(nan_at=5)
        )
    assert sorted(os.listdir(manager.checkpoint_dir(workdir))) == ["2", "4"]
    params = ckpt_lib.load_params(workdir, "params")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_distributed_run_matches_one_process(tmp_path):
    workdir, ref_dir = str(tmp_path / "dist"), str(tmp_path / "ref")
    sets = [
        "--set",
        "train.num_steps=4",
        "--set",
        "checkpoint.every_steps=2",
        "--set",
        "mesh.shape={'data': 2, 'fsdp': 2}",
    ]
    address = f"127.0.0.1:{free_port()}"
    procs = [
        toy_run(
            workdir,
            *sets,
            "--coordinator_address",
            address,
            "--num_processes",
            "2",
            "--process_id",
            str(i),
            devices=2,
        )
        for i in range(2)
    ]
    results = [finish(p, timeout=180) for p in procs]
    for code, out in results:
        assert code == 0, out[-3000:]
    assert "4 devices, 2 processes" in results[0][1]
    assert sorted(os.listdir(manager.checkpoint_dir(workdir))) == ["2", "4"]
    data_files = os.listdir(os.path.join(manager.checkpoint_dir(workdir), "4", "data_iter"))
    assert sorted(f for f in data_files if f.endswith(".json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    # Same config on 4 devices of this one process: same parameters.
    config = toy_config(
        {"train.num_steps": 4, "checkpoint.every_steps": 2, "mesh.shape": {"data": 2, "fsdp": 2}}
    )
    loop.train_and_evaluate(
        config,
        ref_dir,
        task=ToyTask(config),
        make_iterator=iterator_factory(),
        devices=jax.devices()[:4],
    )
    assert_trees_close(
        ckpt_lib.load_params(workdir, "params"), ckpt_lib.load_params(ref_dir, "params")
    )
