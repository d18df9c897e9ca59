"""vdm.tools.aot.wan: Wan 2.1's presets, analytic FLOPs against XLA's count on CPU, and a tiny
Wan's sampler and LoRA step compiled for a TPU v5e 2x2 slice (libtpu on the CPU, no TPU)."""

import dataclasses
import importlib.util
import types

import jax
import jax.numpy as jnp
import pytest

from vdm.config import load_config
from vdm.models.wan.transformer import WanTransformer
from vdm.models.wan.transformer_config import WanTransformerConfig
from vdm.tools.aot import wan, wan_train

TINY = WanTransformerConfig(num_heads=2, head_dim=32, ffn_dim=96, num_layers=2, text_dim=48,
                            freq_dim=16)  # fmt: skip


def test_presets_are_the_published_configs():
    # diffusers' WanTransformer3DModel defaults are the 14B (an empty config.json).
    assert wan.PRESETS["14b"] == WanTransformerConfig.from_diffusers({})
    small = {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
    assert wan.PRESETS["1.3b"] == WanTransformerConfig.from_diffusers(small)
    assert wan.PRESETS["1.3b"].dim == 1536 and wan.PRESETS["14b"].dim == 5120


def test_forward_flops_match_xla_count_on_cpu():
    """The analytic matmul + attention FLOPs of one forward are XLA's count of the same
    forward (XLA attention, CPU) less its element-wise work: under it by less than 3%."""
    arch = WanTransformerConfig(num_heads=2, head_dim=128, ffn_dim=1024, num_layers=2,
                                text_dim=256, freq_dim=64)  # fmt: skip
    model = WanTransformer(arch, attention_kernel="xla")
    x = jnp.zeros((1, 4, 8, 8, 16))
    ctx = jnp.zeros((1, 24, arch.text_dim))
    t = jnp.zeros((1,))
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    compiled = jax.jit(lambda p: model.apply({"params": p}, x, t, ctx)).lower(params).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    tokens = 4 * 4 * 4
    expected = wan.forward_flops(arch, tokens, 24)
    assert 0 <= (analysis["flops"] - expected) / expected < 0.03, (analysis["flops"], expected)


def test_figures_extrapolate_every_field_linearly_in_depth():
    """Compiles at depth 1 and 2 -> f(n) = f(1) + (n - 1) (f(2) - f(1)), memory, FLOPs and
    cost-model time alike (the compile function here reports figures linear in depth)."""
    seen = []

    class Compiled:
        def __init__(self, depth):
            self.depth = depth

        def memory_analysis(self):
            d = self.depth
            return types.SimpleNamespace(
                argument_size_in_bytes=100 * d + 7, output_size_in_bytes=5, alias_size_in_bytes=3,
                temp_size_in_bytes=1000 + 10 * d, generated_code_size_in_bytes=2,
            )  # fmt: skip

        def cost_analysis(self):
            return {"flops": 1e9 * self.depth + 5.0, "optimal_seconds": 0.5 * self.depth + 0.1}

    def compile_fn(b):
        seen.append((b.arch.num_layers, b.compiler_options))
        return Compiled(b.arch.num_layers), 1.0

    arch = dataclasses.replace(TINY, num_layers=30)
    b = wan.WanBuilt("tiny", arch, None, None, None)
    fig = wan.figures(b, compile_fn, full_depth=False)
    assert [d for d, _ in seen] == [1, 2]
    assert all(opts == wan.COUNTING_OPTIONS for _, opts in seen)
    assert fig.memory == dict(arguments=3007, outputs=5, alias=3, temporaries=1300, code=2)
    assert fig.hlo_flops == pytest.approx(30e9 + 5.0)
    assert fig.optimal == pytest.approx(15.1)
    assert "EXTRAPOLATED to 30 blocks" in fig.note and fig.seconds == 2.0
    assert "FELL" not in fig.note
    seen.clear()
    full = wan.figures(b, compile_fn, full_depth=True)
    assert seen == [(30, None)] and full.memory["arguments"] == 3007 and not full.note


@pytest.fixture(scope="module")
def built():
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail('libtpu is not installed: pip install -e ".[tpu-aot]".')
    from vdm.tools.aot import chips

    config = load_config(
        "configs/wan_finetune.py",
        {"mesh.shape": {"data": 2, "fsdp": 1, "tensor": 2}, "train.batch_size": 2},
    )
    with wan.attention.target_platform("tpu"):
        topo = chips.get_topology("v5e:2x2")
        yield wan.build("tiny", config, topo, video=(5, 32, 32), arch=TINY)


def test_train_programs_are_the_wan_stage_step(built):
    """The train / lora programs build stage "wan"'s own task and jitted step: WanTask's loss
    (through vdm.train.setup.build), LoRA by vdm.tasks.lora.wrap with configs/wan_finetune.py:lora's
    rank; the full program trains every param, the LoRA one adapters only."""
    from vdm.tasks.lora import LoraTask
    from vdm.tasks.wan import WanTask

    full = wan_train.step_config(built.config, "train")
    lora = wan_train.step_config(built.config, "lora")
    assert full.optim.lora_rank == 0 and lora.optim.lora_rank == 32 and lora.optim.lora_alpha == 32
    assert full.model.param_dtype == "float32" and lora.model.param_dtype == "bfloat16"
    task = wan_train.AbstractWanTask(full, built)
    assert isinstance(task, WanTask) and task.loss.__func__ is WanTask.loss
    assert task.module.config == TINY and task.module.remat == "block"
    wrapped = wan_train.lora_task.wrap(wan_train.AbstractWanTask(lora, built), lora)
    assert isinstance(wrapped, LoraTask)


def test_tiny_wan_lora_step_compiles_for_tpu(built):
    """The LoRA step of a 2-block Wan for v5e 2x2 (one compile, every block): it fits, the
    splash FLOPs are added, model FLOPs are 3 x the analytic forward per video."""
    with wan.attention.target_platform("tpu"):
        p = wan_train.compile_train(built, "lora", full_depth=True)
    assert p.fits and p.total > 0 and p.hlo_flops > 0
    assert "LoRA rank 32" in p.description and "vdm.tasks.lora" in p.description
    assert "analytic splash-attention FLOPs" in p.description  # auto = splash on TPU
    assert built.tokens == 2 * 2 * 2  # 5 frames -> 2 latent, 32 / 8 / 2 = 2 tokens a side
    f = wan.forward_flops(TINY, built.tokens, wan.TEXT_LENGTH)
    assert p.model_flops == pytest.approx(3 * 2 * f)


def test_wan_sampler_traces_for_tpu(built):
    """WanPipeline.generate (UniPC scan + VAE decode) lowers for the TPU mesh; compiling it is
    what `python -m vdm.tools.aot.wan_cli --programs sample` does (minutes: docs/aot.md)."""
    with wan.attention.target_platform("tpu"):
        lowered = wan.lower_sample(built, 2)
    assert "while" in lowered.as_text()  # the sampler's lax.scan


def test_tiny_wan_full_step_guided_call_and_decode_compile_for_tpu(built):
    """The full fine-tuning step (every param trains: its arguments hold float32 params and two
    AdamW moments), one guided call and the VAE decode, for v5e 2x2."""
    with wan.attention.target_platform("tpu"):
        full = wan_train.compile_train(built, "train", full_depth=True)
        step = wan.compile_step(built, 2, full_depth=True)
        decode = wan.compile_decode(built, 2)
    n = wan.num_params(built)
    assert "full fine-tuning" in full.description
    # float32 params + 2 AdamW moments, sharded at most 4 ways.
    assert full.fits and full.arguments >= 12 * n / 4
    assert step.fits and step.hlo_flops > 0 and "loop body" in step.description
    assert step.model_flops == pytest.approx(2 * 2 * wan.forward_flops(TINY, 8, wan.TEXT_LENGTH))
    assert decode.fits and decode.hlo_flops > 0 and decode.model_flops == 0
    assert "scan body counted once" in decode.description


def test_cli_reports_each_program_as_it_finishes(monkeypatch):
    """`run` hands the report so far to `on_program` after each program (the CLI rewrites its
    JSON then), so a run stopped during a later compile keeps the finished ones."""
    from vdm.tools.aot import wan_cli
    from vdm.tools.aot.report import ProgramReport

    def fake_compile(b, name, sample_batch, full_depth):
        if name == "lora":
            raise KeyboardInterrupt  # stopped during the second compile
        return ProgramReport(name=name, description="", arguments=1, outputs=0, alias=0,
                             temporaries=0, code=0, hlo_flops=1.0, model_flops=1.0,
                             optimal_seconds=1.0, compile_seconds=1.0, hbm_per_device=2,
                             peak_per_device=1.0, num_devices=4)  # fmt: skip

    monkeypatch.setattr(wan_cli, "_compile", fake_compile)
    monkeypatch.setattr(wan, "num_params", lambda b: 0)
    seen = []
    config = load_config("configs/wan_finetune.py", {"mesh.shape": {"data": 1, "fsdp": 4}})
    with pytest.raises(KeyboardInterrupt):
        wan_cli.run("1.3b", config, "v5e:2x2", ["train", "lora"],
                    on_program=lambda r: seen.append([p.name for p in r.programs]))  # fmt: skip
    assert seen == [["train"]]


def test_splash_flops_leave_out_ring_self_attention():
    """Ring attention's blocks are XLA einsums (counted by XLA): with a sequence axis > 1 and
    sequence_parallel=ring only the cross-attention's splash FLOPs are added."""
    arch = dataclasses.replace(TINY, num_layers=3)
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "sequence": 3, "tensor": 1})
    topo = types.SimpleNamespace(devices=[0] * 12)

    def built(method):
        config = load_config("configs/wan_finetune.py", {"model.sequence_parallel": method})
        return wan.WanBuilt("tiny", arch, wan.wan_config(config, (5, 32, 32)), topo, mesh)

    ulysses, ring = wan.splash_flops(built("ulysses"), 1), wan.splash_flops(built("ring"), 1)
    tokens, d = 8, arch.dim
    assert ulysses == pytest.approx(wan.attention_flops(arch, tokens, wan.TEXT_LENGTH) / 12)
    assert ring == pytest.approx(3 * 4.0 * tokens * wan.TEXT_LENGTH * d / 12)


def test_figures_say_when_a_field_falls_with_depth():
    """Temporaries lower at 2 blocks than at 1 (the compiler scheduled them differently): the
    note says the line through them is not usable."""

    class Compiled:
        def __init__(self, depth):
            self.depth = depth

        def memory_analysis(self):
            return types.SimpleNamespace(
                argument_size_in_bytes=100 * self.depth, output_size_in_bytes=0,
                alias_size_in_bytes=0, temp_size_in_bytes=1000 - 10 * self.depth,
                generated_code_size_in_bytes=0,
            )  # fmt: skip

        def cost_analysis(self):
            return {"flops": 1e9 * self.depth}

    b = wan.WanBuilt("tiny", dataclasses.replace(TINY, num_layers=40), None, None, None)
    fig = wan.figures(b, lambda b: (Compiled(b.arch.num_layers), 1.0), full_depth=False)
    assert "temporaries FELL from 1 to 2 blocks" in fig.note
    assert "arguments FELL" not in fig.note
