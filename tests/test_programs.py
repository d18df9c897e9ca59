"""Traced programs kept between runs (vdm.io.programs): the kept program gives the same bits as
the traced one, a later pipeline loads it instead of tracing, and anything in the key that
changes (closure, arguments, vdm's source, XLA_FLAGS) misses."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_reproducibility import A, B, tiny_pipeline
from vdm.io import programs


@pytest.fixture
def kept(tmp_path):
    """Programs kept in a fresh directory for the test, off again afterwards."""
    programs.set_directory(str(tmp_path / "exported"))
    assert programs.directory() is not None, "flatbuffers is missing (a vdm dependency)"
    yield tmp_path / "exported"
    programs.set_directory(None)


def _files(directory, prefix):
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(f for f in names if f.startswith(prefix) and f.endswith(programs.SUFFIX))


def test_kept_program_is_the_traced_one_and_is_loaded_later(kept, monkeypatch):
    pipe = tiny_pipeline(devices=jax.devices()[:1])
    programs.set_directory(None)
    traced = pipe([A, B], seed=3)  # plain jit: no program written
    assert not _files(kept, "sample-")
    programs.set_directory(str(kept))
    exported = pipe([A, B], seed=3)  # traced, exported, saved, and run from the saved bytes
    np.testing.assert_array_equal(exported, traced)
    assert len(_files(kept, "sample-")) == len(_files(kept, "text-")) == 1
    assert any(f.startswith("text-params-") for f in os.listdir(kept))  # param shapes (json)

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced again instead of loading the kept program")

    monkeypatch.setattr(jax.export, "export", no_tracing)
    later = dataclasses.replace(pipe)  # a new pipeline: what a second process does
    np.testing.assert_array_equal(later([A, B], seed=3), traced)
    # What the sampling program closes over is its key: e.g. the latent statistics (constants
    # in the program) and the devices (test_every_part_of_the_key_counts: any key change misses).
    c = pipe.config.vae.latent_channels
    other = dataclasses.replace(pipe, latent_stats={"shift": [0.5] * c, "scale": [1.0] * c})
    on_8 = dataclasses.replace(pipe, devices=jax.devices())
    assert len({p._program.key for p in (pipe, later, other, on_8)}) == 3


def test_a_damaged_program_is_traced_again(kept, caplog):
    f = programs.Cached(jax.jit(lambda x, *, n: jnp.tanh(x) * n, static_argnames="n"), "f", "")
    x = jnp.arange(4.0)
    expected = np.asarray(jnp.tanh(x) * 2)
    np.testing.assert_array_equal(f(x, n=2), expected)
    (name,) = _files(kept, "f-")
    with open(kept / name, "r+b") as file:
        file.truncate(40)
    again = programs.Cached(f.fn, "f", "")
    np.testing.assert_array_equal(again(x, n=2), expected)
    assert "unreadable" in caplog.text
    assert os.path.getsize(kept / name) > 40  # replaced by a good one
    data = bytearray((kept / name).read_bytes())  # one flipped bit in the program's bytes
    data[len(data) // 2] ^= 1
    (kept / name).write_bytes(bytes(data))
    caplog.clear()
    np.testing.assert_array_equal(programs.Cached(f.fn, "f", "")(x, n=2), expected)
    assert "checksum" in caplog.text


def test_every_part_of_the_key_counts(kept, monkeypatch, tmp_path):
    f = programs.Cached(jax.jit(lambda x, *, n: x * n, static_argnames="n"), "f", "closure")
    x = jnp.ones((2, 3))
    key = f.cache_key((x,), {"n": 2})
    assert f.cache_key((jnp.ones((2, 3)),), {"n": 2}) == key  # same everything: a hit
    misses = [
        programs.Cached(f.fn, "f", "other closure").cache_key((x,), {"n": 2}),
        f.cache_key((x,), {"n": 3}),  # static argument
        f.cache_key((jnp.ones((3, 2)),), {"n": 2}),  # shape
        f.cache_key((x.astype(jnp.bfloat16),), {"n": 2}),  # dtype
        f.cache_key(([x],), {"n": 2}),  # tree
        f.cache_key((jax.device_put(x, jax.devices()[1]),), {"n": 2}),  # placement
    ]
    assert key not in misses and len(set(misses)) == len(misses)
    # The environment: vdm's source and XLA_FLAGS (library versions and devices alike).
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text("x = 1\n")
    monkeypatch.setattr(programs, "_VDM_ROOT", str(src))
    fingerprints = []
    changes = (
        lambda: None,
        lambda: (src / "m.py").write_text("x = 2\n"),
        lambda: monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true"),
    )
    for change in changes:
        change()
        programs.environment.cache_clear()
        fingerprints.append(programs.environment())
    monkeypatch.undo()
    programs.environment.cache_clear()
    assert len(set(fingerprints)) == 3


def test_remembered_values_are_computed_once(kept):
    calls = []

    def compute():
        calls.append(1)
        return {"a": [1, 2]}

    assert programs.remembered("shapes", "k", compute) == {"a": [1, 2]}
    assert programs.remembered("shapes", "k", compute) == {"a": [1, 2]}
    assert len(calls) == 1
    programs.remembered("shapes", "other key", compute)
    assert len(calls) == 2


def test_a_program_export_cannot_keep_still_runs(kept, caplog):
    """A host callback cannot be serialized: plain jit, with a warning; the program's own errors
    still raise as themselves."""

    def host_sin(x):
        return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    f = programs.Cached(jax.jit(host_sin), "callback", "")
    x = jnp.arange(3.0)
    np.testing.assert_allclose(f(x), np.sin(np.arange(3.0)), rtol=1e-6)
    assert "not kept between runs" in caplog.text and not _files(kept, "callback-")
    g = programs.Cached(jax.jit(lambda x: x @ x), "bad", "")
    with pytest.raises(TypeError, match="dot_general"):
        g(jnp.ones((2, 3)))
