"""Exports a Wan fine-tuning run (stage "wan") as a Diffusers-format Wan 2.1 pipeline directory.

  python -m vdm.tools.export --checkpoint workdirs/wan --output exported/wan-tuned

The directory is the base pipeline's (`model.pretrained`: model_index.json, vae/, text_encoder/,
tokenizer/, scheduler/, hard-linked where the file system allows, else copied) with the run's
transformer in `transformer/diffusion_pytorch_model.safetensors` (float32; a LoRA run's adapters
merged into the base weights, W + (alpha / r) A B), plus `train_log.jsonl` (the run's
metrics.jsonl) and `vdm_source.json` (the checkpoint and base it came from). `sample.py
--checkpoint OUT`, `vdm.load_pipeline(OUT)` and diffusers' `WanPipeline.from_pretrained(OUT)`
load it. It is written into a staging folder beside OUT and then moved in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from safetensors.numpy import save_file

from vdm import paths
from vdm.errors import UserError
from vdm.inference import wan
from vdm.io import checkpoint as ckpt_lib
from vdm.models.wan import files
from vdm.models.wan import pipeline as wan_pipeline
from vdm.models.wan.transformer_weights import to_diffusers, transformer_dir


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link to `src` (its target, for a symlink) at `dst`, or a copy across devices."""
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _copy_base(root: str, staging: str) -> None:
    """Every part of the base pipeline but its transformer weights into `staging`."""
    for name in sorted(os.listdir(root)):
        src, dst = os.path.join(root, name), os.path.join(staging, name)
        if name == "transformer" or name.startswith("."):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _write_transformer(pipe, root: str, staging: str) -> None:
    base = transformer_dir(root)
    out = os.path.join(staging, "transformer")
    os.makedirs(out)
    shutil.copyfile(os.path.join(base, "config.json"), os.path.join(out, "config.json"))
    tensors = to_diffusers(pipe.params, pipe.model, files.weights(base, None))
    path = os.path.join(out, f"{files.DIFFUSERS_STEM}.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, os.stat(os.path.join(out, "config.json")).st_mode & 0o777)


def _check_output(output: str) -> str:
    output = paths.check_output_dir(output, "--output", create=False)
    if os.path.isdir(output) and os.listdir(output) and not wan_pipeline.is_wan_pipeline(output):
        raise UserError(
            f"--output '{output}' is a non-empty directory that is not a Wan pipeline; a Wan "
            "export replaces its output directory as a whole. Give a new or empty directory."
        )
    return output


def export(checkpoint: str, output: str) -> dict[str, str]:
    """Writes the Diffusers-format pipeline of the stage "wan" run `checkpoint` to `output`
    (module docstring); an earlier Wan export there is replaced.

    Returns:
      {"bundle": output, "train_log": its copy of the run's metrics.jsonl}.

    Raises:
      UserError: no such run, an unreadable base pipeline, or an `output` that is another kind
        of directory.
    """
    output = _check_output(output)
    pipe = wan.load_wan_checkpoint(checkpoint)
    root = pipe.config.model.path
    parent = os.path.dirname(output) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the export is not
    try:
        _copy_base(root, staging)
        _write_transformer(pipe, root, staging)
        steps_dir, step = ckpt_lib.resolve(checkpoint)
        source = {"checkpoint": os.path.abspath(checkpoint), "step": step, "base": root}
        with open(os.path.join(staging, "vdm_source.json"), "w") as f:
            json.dump(source, f, indent=1)
        log = os.path.join(os.path.dirname(os.path.abspath(steps_dir)), "metrics.jsonl")
        if os.path.isfile(log):
            shutil.copyfile(log, os.path.join(staging, "train_log.jsonl"))
        if os.path.isdir(output):
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"bundle": output, "train_log": os.path.join(output, "train_log.jsonl")}
