"""When a program does not fit: the error, the TPU compiler's out-of-memory message made
readable, and which config knob to turn first."""

from __future__ import annotations

import math
import re

from vdm.errors import UserError
from vdm.models import autoencoder
from vdm.tools.aot.chips import GiB, Topology

# The TPU compiler's out-of-memory line: used, capacity, excess (e.g. "12.5G").
OOM = re.compile(
    r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm\. Exceeded hbm capacity by ([\d.]+[KMGT]?)"
)
# Its other form, when the temporaries alone exceed HBM (no total is given): temporaries, HBM.
OOM_TEMPORARIES = re.compile(
    r"memory required for HLO temporaries \(([\d.]+[KMGT]?)\) exceeds available HBM "
    r"\(([\d.]+[KMGT]?)\)"
)


class DoesNotFit(UserError):
    """A program needs more HBM per device than the chip has."""


def is_out_of_memory(error: Exception) -> bool:
    """Whether a compile error is the TPU compiler refusing a program over HBM."""
    return "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error)


def parse_bytes(text: str) -> int:
    """Bytes of a size such as "12.5G" (K, M, G, T are powers of 1024)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(float(text))


def oom_used_bytes(message: str) -> int:
    """The bytes the compiler said a program needs, from its out-of-memory message (0 if none)."""
    m = OOM.search(message) or OOM_TEMPORARIES.search(message)
    return parse_bytes(m.group(1)) if m else 0


def oom_message(config, program: str, topology: Topology, error: Exception, mesh_shape=None) -> str:
    """The compiler's out-of-memory error as: what did not fit where, by how much, what to do.

    `mesh_shape`: the resolved mesh, for the advice when the compiler names the temporaries.
    """
    text = str(error)
    m, temps = OOM.search(text), OOM_TEMPORARIES.search(text)
    head = (
        f"{program} does not fit on {topology.name} ({topology.device_kind}, "
        f"{topology.hbm_per_device / GiB:.1f} GiB HBM per device)"
    )
    if m:
        head += f": the TPU compiler needs {m.group(1)}B of {m.group(2)}B, over by {m.group(3)}B"
    elif temps:
        head += f": its temporaries alone need {temps.group(1)}B of {temps.group(2)}B"
    model = config.get("model") or {}
    xla = model.get("attention_kernel") == "xla"
    note = (
        "The XLA attention (model.attention_kernel=xla) keeps every attention's float32 logits "
        "[heads, queries, keys] in HBM; the splash kernel (attention_kernel=auto on TPU) never "
        "writes them: use it first. "
        if xla
        else ""
    )
    if program == "train_step" and temps:
        advice = note + knob_advice(config, program, 0, parse_bytes(temps.group(1)), mesh_shape)
    elif program == "train_step":
        advice = note + (
            "Raise mesh.fsdp (splits params, optimizer state and frozen weights), set "
            "model.remat=block (recomputes activations) or lower train.batch_size."
        )
    else:
        advice = note + "Lower --sample_batch or raise mesh.fsdp."
    detail = "\n".join(ln for ln in text.splitlines()[:12] if ln.strip())
    return f"{head}. {advice}\nCompiler report:\n{detail}"


def knob_advice(config, program: str, arguments: float, temporaries: float, mesh_shape=None) -> str:
    """Which config knob to turn first for a program that does not fit, and why.

    `mesh_shape`: the resolved mesh ({"data": 8, ...}); default the config's (data may be -1).

    The batch is split over data x fsdp only ("batch shards"); a tensor axis splits heads and MLP
    widths but holds a replica of its shard's videos. So trading fsdp (or data) for tensor at the
    same global batch doubles the videos per shard: the residual stream per device doubles and the
    head / MLP activations stay the same (docs/aot.md, the 10B on v6e:8x8). A tensor axis shrinks
    activations only with the batch per update kept by gradient accumulation
    (train.batch_size / 2, optim.accumulate_steps x 2).
    """
    shape = dict(mesh_shape or config.mesh.shape)
    fsdp = int(shape.get("fsdp", 1))
    tips = []
    if arguments >= temporaries:
        tips.append(
            f"parameters / optimizer state / frozen weights dominate ({arguments / GiB:.1f} GiB of "
            f"arguments): raise mesh.fsdp (now {fsdp}) so they are split over more devices, e.g. "
            f"--config.mesh.shape=\"{{'data': -1, 'fsdp': {max(2, 2 * int(fsdp))}}}\""
        )
    if temporaries > arguments or not tips:
        tips.append(_activation_advice(config, program, temporaries, shape))
    return "; ".join(tips) + "."


def _mesh_str(shape: dict, **changes) -> str:
    """A --config.mesh.shape value: `shape` (data as -1) with `changes`, size-1 axes dropped
    except data and fsdp."""
    new = {**{a: int(n) for a, n in shape.items()}, **changes, "data": -1}
    keep = ("data", "fsdp")
    return "{" + ", ".join(f"'{a}': {n}" for a, n in new.items() if a in keep or n != 1) + "}"


def _activation_advice(config, program: str, temporaries: float, shape: dict) -> str:
    """The knob for activations (temporaries) that do not fit."""
    data, fsdp = int(shape.get("data", 1)), int(shape.get("fsdp", 1))
    tensor = int(shape.get("tensor", 1))
    # A tensor axis of twice the size, taken from data if there is one, else from fsdp.
    new_fsdp = fsdp if data >= 2 else max(1, fsdp // 2)
    mesh = _mesh_str(shape, fsdp=new_fsdp, tensor=2 * tensor)
    act = f"activations dominate ({temporaries / GiB:.1f} GiB of temporaries)"
    remat = config.model.get("remat", "none") if "model" in config else "none"
    if program == "train_step" and remat != "block":
        return (
            f"{act}: recompute them in the backward pass with --config.model.remat=block "
            f"(now {remat!r})"
        )
    if program == "train_step" and data > 0:
        return _batch_advice(config, act, shape, mesh)
    return (
        f"{act}: lower --sample_batch (the default is one video per data x fsdp shard), or "
        "shard them over a tensor axis (mesh.tensor splits heads and MLP widths; the "
        "default --sample_batch halves with data x fsdp), e.g. "
        f'--config.mesh.shape="{mesh}"'
    )


def _token_frames(config) -> int | None:
    """Token frames of a denoiser config's videos (latent frames / patch t), None otherwise."""
    if config.get("stage") != "denoiser":
        return None
    d = config.data
    try:
        t = autoencoder.latent_shape(config.vae, d.num_frames, d.height, d.width)[0]
    except (ValueError, KeyError, AttributeError):
        return None
    return t // int(config.model.patch_size[0])


def _sequence_factor(config, shape: dict) -> int | None:
    """The smallest k > 1 by which the `sequence` axis can grow, taken from data or fsdp: the
    new size divides the token frames (and the heads, for Ulysses). None if there is none."""
    frames = _token_frames(config)
    if not frames:
        return None
    seq, heads = int(shape.get("sequence", 1)), int(config.model.num_heads)
    ulysses = config.model.get("sequence_parallel", "ulysses") == "ulysses"
    for k in range(2, frames // seq + 1):
        s = seq * k
        if frames % s or (ulysses and heads % s):
            continue
        if int(shape.get("data", 1)) % k == 0 or int(shape.get("fsdp", 1)) % k == 0:
            return k
    return None


def _batch_advice(config, act: str, shape: dict, mesh: str) -> str:
    """For a train step with block remat: fewer videos per batch shard, same batch per update."""
    batch = int(config.train.batch_size)
    accumulate = int(config.optim.get("accumulate_steps", 1)) if "optim" in config else 1
    shards = int(shape.get("data", 1)) * int(shape.get("fsdp", 1))
    per_shard = batch / shards
    if per_shard > 1:
        k = math.ceil(per_shard)
        return (
            f"{act} of {per_shard:g} videos per batch shard (train.batch_size={batch} "
            f"over data x fsdp = {shards}): one per shard, with the batch per update "
            f"kept by accumulation: --config.train.batch_size={shards} "
            f"--config.optim.accumulate_steps={k * accumulate}"
        )
    head = f"{act} of {per_shard:g} video(s) per batch shard (data x fsdp); "
    k = _sequence_factor(config, shape)
    if k:
        seq, data = int(shape.get("sequence", 1)), int(shape.get("data", 1))
        axis = "data" if data % k == 0 else "fsdp"
        seq_mesh = _mesh_str(shape, sequence=seq * k, **{axis: int(shape[axis]) // k})
        return (
            head + f"split each video's tokens {k} ways more over a sequence axis (it splits "
            "every token activation, the residual stream included, where a tensor axis keeps "
            "a replica of it; like tensor it holds a replica of its shard's batch, so keep the "
            f'batch per update by accumulation): --config.mesh.shape="{seq_mesh}" '
            f"--config.train.batch_size={max(1, batch // k)} "
            f"--config.optim.accumulate_steps={k * accumulate}"
        )
    return (
        head + "a bigger tensor axis at this batch would put more videos on each shard (it "
        "holds a replica of its shard's batch), so share each video between devices and keep "
        f'the batch per update by accumulation: --config.mesh.shape="{mesh}" '
        f"--config.train.batch_size={max(1, batch // 2)} "
        f"--config.optim.accumulate_steps={2 * accumulate}"
    )
