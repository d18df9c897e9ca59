"""vdm.tools.aot (the package: chips, advice, report, table, abstract, programs, runner and the
`python -m vdm.tools.aot` command): compile the tiny config's train step, sampler and text
encoder for a TPU v5e 2x2 slice on the CPU (libtpu's compiler, no TPU), and check shardings, the
memory report and the errors.

Needs libtpu: `pip install -e ".[tpu-aot]"`. Without it these tests FAIL (not skip), so CI cannot
silently stop checking that the sharding rules compile for TPU.
"""

import dataclasses
import importlib.util
import json

import pytest

TOPOLOGY = "v5e:2x2"
TINY = {
    "model.depth": 2,
    "model.width": 32,
    "model.num_heads": 2,
    "vae.variant": "mu",
    "data.num_frames": 5,
    "data.height": 16,
    "data.width": 16,
    "text_encoder.max_length": 8,
    "train.batch_size": 4,
    "sample.num_steps": 2,
    "mesh.shape": {"data": 2, "fsdp": 2, "tensor": 1},
}


def _require_libtpu():
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail(
            "libtpu is not installed, so tests/test_aot.py cannot compile for a TPU topology. "
            'Install the extra: pip install -e ".[tpu-aot]" (jax[tpu] matching the installed jax).',
            pytrace=False,
        )


@pytest.fixture(scope="module")
def aot():
    _require_libtpu()
    from vdm.tools import aot

    return aot


@pytest.fixture(scope="module")
def tiny_config():
    from vdm.config import load_config

    return load_config("configs/base.py", TINY)


@pytest.fixture(scope="module")
def report(aot, tiny_config):
    return aot.run(tiny_config, TOPOLOGY)


def test_topology_and_mesh_errors(aot, tiny_config):
    from vdm.config import load_config
    from vdm.errors import ConfigError

    with pytest.raises(ConfigError, match="GENERATION:SHAPE"):
        aot.get_topology("v9:2x2")
    topo = aot.get_topology(TOPOLOGY)
    assert len(topo.devices) == 4 and topo.hbm_per_device == 16 * 2**30
    bad = load_config("configs/base.py", {**TINY, "mesh.shape": {"data": 3}})
    with pytest.raises(ConfigError, match=r"4 devices"):
        aot.make_topology_mesh(bad, topo)


def test_programs_compile_with_sharded_params(report, tiny_config):
    from jax.sharding import PartitionSpec as P

    assert [p.name for p in report.programs] == ["train_step", "sample", "text_encode"]
    assert report.mesh == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 1}
    assert report.params["trainable"] > 0 and report.params["text_encoder"] > 20e6
    state, batch, _, frozen = report.compiled["train_step"].input_shardings[0]
    # Logical rules on the compiled program: fc1 kernel (embed, mlp) -> (fsdp, tensor), the
    # batch over (data, fsdp), the frozen text encoder's embedding table (vocab, embed) on fsdp.
    assert state.params["block_0"]["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
    assert state.opt_state[1][0].mu["block_0"]["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
    assert next(iter(batch.values())).spec == P(("data", "fsdp"))
    assert frozen["text"]["word_embeddings"]["embedding"].spec == P(None, "fsdp")


def test_memory_and_cost_report(report, aot):
    for p in report.programs:
        fields = (p.arguments, p.outputs, p.alias, p.temporaries, p.code)
        assert all(isinstance(f, int) and f >= 0 for f in fields), p
        assert p.arguments > 0 and p.code > 0
        assert p.total == p.arguments + p.outputs - p.alias + p.temporaries + p.code
        assert p.fits and p.hbm_per_device == 16 * 2**30
        assert p.hlo_flops > 0 and p.compile_seconds > 0
        assert p.projected_seconds >= p.hlo_flops / p.peak_per_device
    train = report.programs[0]
    assert train.alias > 0  # the state is donated
    assert 0 < train.projected_mfu < 1
    text = aot.format_report(report, "tiny")
    assert "| train_step |" in text and "projected" in text.lower()
    json.dumps(report.to_json())


def test_scanned_layers_compile_and_report_the_unrolled_flops(aot):
    """`model.scan_layers`: params get a leading replicated "layers" dim, and since XLA counts a
    loop body once the report extrapolates FLOPs from unrolled depth 1 and 2 compiles; at depth 3
    that must match compiling depth 3 unrolled."""
    from jax.sharding import PartitionSpec as P

    from vdm.config import load_config

    # Cached latents (no VAE / text encoder in the step) and width 128: the blocks dominate.
    deep = {**TINY, "model.depth": 3, "model.width": 128, "data.source": "cache:/unused"}
    unrolled = aot.run(load_config("configs/base.py", deep), TOPOLOGY, ["train_step"])
    scanned_config = load_config("configs/base.py", {**deep, "model.scan_layers": True})
    scanned = aot.run(scanned_config, TOPOLOGY, ["train_step"])
    state = scanned.compiled["train_step"].input_shardings[0][0]
    assert state.params["blocks"]["block"]["mlp"]["fc1"]["kernel"].spec == P(None, "fsdp", "tensor")
    want, got = unrolled.programs[0].hlo_flops, scanned.programs[0].hlo_flops
    assert got == pytest.approx(want, rel=0.02), (got, want)
    raw = scanned.compiled["train_step"].cost_analysis()["flops"]
    assert raw < 0.9 * want  # what the extrapolation corrects: the loop body counted once
    assert "unrolled depth 1 and 2" in scanned.programs[0].description


def test_does_not_fit_names_the_knob(report, aot, tiny_config):
    small = dataclasses.replace(report.programs[0], hbm_per_device=1024.0)
    tight = dataclasses.replace(report, programs=[small])
    with pytest.raises(aot.DoesNotFit, match=r"train_step does not fit.*over by") as e:
        aot.check_fit(tight, tiny_config)
    assert "mesh.fsdp" in str(e.value) or "model.remat" in str(e.value)


def test_activation_advice_keeps_videos_per_batch_shard(aot):
    """With block remat and one video per (data x fsdp) shard, the advice is a tensor axis WITH
    half the batch and twice the accumulation: at the same batch a tensor axis doubles the videos
    per shard (it splits heads / MLP, not the batch). More than one video per shard: fewer.
    When the token frames (and heads, for Ulysses) divide, a sequence axis comes first: it
    splits the residual stream too; a size that divides neither is never advised."""
    from vdm.config import load_config

    base = {**TINY, "model.remat": "block", "train.batch_size": 64}
    single = load_config("configs/base.py", {**base, "data.num_frames": 1})  # 1 token frame
    gib = aot.GiB
    one = aot.knob_advice(single, "train_step", 3 * gib, 29 * gib, {"data": 1, "fsdp": 64})
    assert "'fsdp': 32, 'tensor': 2" in one and "batch_size=32" in one, one
    assert "accumulate_steps=2" in one and "sequence" not in one, one
    two = aot.knob_advice(
        single, "train_step", 3 * gib, 35 * gib, {"data": 1, "fsdp": 32, "tensor": 2}
    )
    assert "2 videos per batch shard" in two and "batch_size=32" in two, two
    assert "'tensor': 4" not in two, two
    frames2 = load_config("configs/base.py", base)  # 5 frames -> 2 latent / token frames
    seq = aot.knob_advice(frames2, "train_step", 3 * gib, 29 * gib, {"data": 1, "fsdp": 64})
    assert "'fsdp': 32, 'sequence': 2}" in seq and "batch_size=32" in seq, seq
    assert "accumulate_steps=2" in seq and "tensor" in seq, seq
    # 21 token frames, 12 heads, Ulysses: only 3 (or 21) would do, and 3 divides no axis here.
    joint = load_config("configs/scale/dit_joint_480p.py")
    shape = {"data": 4, "fsdp": 16, "sequence": 1, "tensor": 1}
    none = aot.knob_advice(joint, "train_step", 3 * gib, 40 * gib, shape)
    assert "'sequence'" not in none and "'tensor': 2" in none, none


def test_out_of_memory_on_temporaries_is_read_and_points_at_splash(aot):
    """The compiler's other out-of-memory form (temporaries alone over HBM; what the XLA
    attention of the joint 480p config gets on v6e:4x4, docs/aot.md) gives the bytes and the
    kernel: the XLA attention keeps its logits in HBM, splash does not."""
    from vdm.config import load_config
    from vdm.tools.aot.advice import is_out_of_memory, oom_message, oom_used_bytes

    text = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (80.07G) exceeds available HBM (31.25G)."
    )
    assert is_out_of_memory(RuntimeError(text))
    assert oom_used_bytes(text) == int(80.07 * aot.GiB)
    overrides = {"model.attention_kernel": "xla", "train.batch_size": 16}
    config = load_config("configs/scale/dit_joint_480p.py", overrides)
    shape = {"data": 1, "fsdp": 16, "sequence": 1, "tensor": 1}
    msg = oom_message(config, "train_step", aot.get_topology(TOPOLOGY), RuntimeError(text), shape)
    assert "temporaries alone need 80.07GB of 31.25GB" in msg, msg
    assert "attention_kernel=auto" in msg and "1 video(s) per batch shard" in msg, msg


def test_installed_libtpu_is_quiet_on_a_cpu_host():
    """With libtpu installed (this extra) and no TPU attached, importing vdm and using JAX prints
    none of libtpu's "could not determine TPU accelerator type / worker hostnames" messages."""
    import os
    import subprocess
    import sys

    _require_libtpu()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_PLATFORMS"))}
    code = "import vdm, jax; print(jax.devices()[0].platform)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("cpu", "gpu", "cuda", "tpu")
    for noise in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "INVALID_ARGUMENT"):
        assert noise not in out.stderr, out.stderr


def test_command_line_names_a_bad_topology():
    """`python -m vdm.tools.aot` parses its flags and turns a ConfigError into a message."""
    import subprocess
    import sys

    _require_libtpu()
    out = subprocess.run(
        [sys.executable, "-m", "vdm.tools.aot", "--config", "configs/base.py",
         "--topology", "v9:2x2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert "--topology='v9:2x2' is not GENERATION:SHAPE" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


def test_splash_attention_compiles_for_tpu_and_its_flops_are_added(aot):
    """attention_kernel "auto" is splash for a TPU topology: the Mosaic kernels compile for v5e
    inside shard_map (batch over data, heads over tensor), and since XLA's cost analysis does not
    see inside them the report adds the analytic attention FLOPs."""
    from vdm.config import load_config
    from vdm.tools.aot.abstract import build
    from vdm.tools.aot.programs import splash_flops, train_passes

    mesh = {"data": 2, "fsdp": 1, "tensor": 2}
    cached = {**TINY, "data.source": "cache:/unused", "mesh.shape": mesh}
    config = load_config("configs/base.py", cached)
    assert config.model.attention_kernel == "auto"
    report = aot.run(config, TOPOLOGY, ["train_step"])
    compiled, train = report.compiled["train_step"], report.programs[0]
    # 2 blocks x (spatial, temporal, cross) x (forward, dq, dkv kernels).
    assert compiled.as_text().count("tpu_custom_call") == 18
    extra = train.hlo_flops - compiled.cost_analysis()["flops"]
    assert extra > 0 and "analytic splash-attention FLOPs" in train.description
    b = build(config, aot.get_topology(TOPOLOGY))
    assert extra == pytest.approx(splash_flops(b, 4 * train_passes(config)))


def test_splash_kernel_alone_is_invisible_to_cost_analysis_and_runs_in_shard_map(aot):
    """One splash attention for v5e: cost_analysis counts ~0.1% of its FLOPs (the q scaling);
    with a batch that does not divide over the mesh it still runs in a (replicated) shard_map."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from vdm.models import attention as A

    mesh = Mesh(np.asarray(aot.get_topology(TOPOLOGY).devices).reshape(4), ("data",))
    s = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    flops = {}
    for kernel in ("splash", "xla"):
        with A.target_platform("tpu"), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            fn = jax.jit(lambda q, k, v, kernel=kernel: A.attention(q, k, v, kernel=kernel))
            flops[kernel] = fn.lower(s, s, s).compile().cost_analysis()["flops"]
    analytic = 4 * 2 * 1024 * 1024 * 128
    assert flops["xla"] == pytest.approx(analytic, rel=0.05)
    assert flops["splash"] < 0.01 * analytic
