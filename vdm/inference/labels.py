"""Labels on what sample.py writes: each file says it is AI-generated, and by what.

The label of a video is its samples.jsonl record (prompt, indices, seed, sampler settings) plus
`provenance`: {"ai_generated": true, "generator", "model" (the checkpoint or exported model it came
from), "model_config_hash", "manifest_hash" and "training_examples_hash" (the data its denoiser
was trained on, `vdm.provenance`; null where the model records none), "code_version"}. It is
stored
  mp4 / webm   container metadata: `comment` = the label as JSON, `description` = one sentence
  png          text chunks: `Description`, `Comment` (the JSON), `Software`, `Source`
  gif          its comment (after vdm's frame-duration tag)
  npy, latent  samples.jsonl only (the latent .npz also holds the JSON, `vdm.inference.latents`)
Only container metadata is added: the frames are the same bytes as without a label.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from vdm import provenance
from vdm.errors import UserError
from vdm.io import bundle

FIELD = "provenance"


def model_label(checkpoint: str | None, config) -> dict[str, Any]:
    """The model part of every label of a run (module docstring).

    Args:
      checkpoint: what sample.py was given (None: the bundled model).
      config: the model's config.
    """
    path = checkpoint or bundle.DEFAULT_MODEL
    records: dict = {}
    if os.path.exists(path):
        try:
            records = provenance.of_model(path)
        except (OSError, ValueError, UserError):  # a checkpoint without metadata: not recorded
            records = {}
    record = records.get("denoiser", records.get("model")) or {}
    data = record.get("data") or {}
    return {
        "ai_generated": True,
        "generator": "vdm",
        "model": "vdm bundled default model" if checkpoint is None else _model_id(path),
        "model_config_hash": provenance.config_hash(config),
        "manifest_hash": data.get("manifest_hash"),
        "training_examples_hash": data.get("used_hash"),
        "code_version": provenance.code_version(),
    }


def _model_id(path: str) -> str:
    return os.path.abspath(path) if os.path.exists(path) else path  # a hub id stays as given


def description(record: Mapping[str, Any]) -> str:
    """One sentence a person reads: what made the file, from what prompt."""
    model = record.get(FIELD, {}).get("model", "a vdm model")
    return f"AI-generated video, made by vdm ({model}) from the prompt {record['prompt']!r}."


def container_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """mp4 / webm / gif metadata of a file's record."""
    return {"comment": json.dumps(record, sort_keys=True), "description": description(record)}


def png_text(record: Mapping[str, Any]) -> dict[str, str]:
    """PNG text chunks of a file's record."""
    return {
        "Description": description(record),
        "Comment": json.dumps(record, sort_keys=True),
        "Software": "vdm",
        "Source": record.get(FIELD, {}).get("model", "vdm"),
    }
