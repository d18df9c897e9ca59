"""Where a Diffusers-format pipeline's files are, and reading them (no torch).

A Diffusers pipeline directory (e.g. the hub repo `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) holds:

```
model_index.json            {"_class_name": "WanPipeline", "transformer": [lib, class], ...}
transformer/  config.json + diffusion_pytorch_model.safetensors (or -0000k-of-0000n shards
              + diffusion_pytorch_model.safetensors.index.json)
vae/          config.json + diffusion_pytorch_model.safetensors
text_encoder/ config.json + model.safetensors (or shards + model.safetensors.index.json)
tokenizer/    tokenizer.json / spiece.model + tokenizer_config.json ...
scheduler/    scheduler_config.json
```

`pipeline_dir(name_or_path)` turns a local directory or a hub id into a local directory (a hub
id read from a checkpoint must already be in the local cache: `vdm.models.text.hub.recorded`),
`component_dir(root, "vae")` checks one part is there, `read_config` reads its JSON, and
`weights(dir, dtype)` opens its safetensors lazily (`vdm.models.text.weights.Weights`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from vdm.models.text import hub
from vdm.models.text.weights import Weights

DIFFUSERS_STEM = "diffusion_pytorch_model"
# What a pipeline download fetches: configs, safetensors weights and tokenizer files (no .bin,
# no .pth, no other precisions' copies under other names).
PIPELINE_FILES = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    f"*/{DIFFUSERS_STEM}.safetensors",
    f"*/{DIFFUSERS_STEM}.safetensors.index.json",
    f"*/{DIFFUSERS_STEM}-*.safetensors",
    "*/model.safetensors",
    "*/model.safetensors.index.json",
    "*/model-*.safetensors",
    "tokenizer/*",
]


def pipeline_dir(name_or_path: str) -> str:
    """The local directory of a Diffusers-format pipeline given as a directory or a hub id."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(
                f"'{name_or_path}' has no model_index.json (it holds: "
                f"{sorted(os.listdir(path))[:20]}); it is not a Diffusers-format pipeline "
                "directory (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
                "scheduler/)."
            )
        return path
    if os.path.exists(path):
        raise FileNotFoundError(
            f"'{name_or_path}' is a file; give a Diffusers-format pipeline directory or hub id."
        )
    if not hub.is_hub_id(name_or_path):
        raise FileNotFoundError(
            f"'{name_or_path}' does not exist: give a local Diffusers-format pipeline directory "
            "or a Hugging Face hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers."
        )
    return hub.download(name_or_path, PIPELINE_FILES, what="Pipeline")


def component_dir(root: str, name: str) -> str:
    """`root/name`, checked to hold a config (config.json or scheduler_config.json)."""
    path = os.path.join(root, name)
    configs = ("config.json", "scheduler_config.json", "tokenizer_config.json")
    if not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, c)) for c in configs):
        present = sorted(os.listdir(root)) if os.path.isdir(root) else []
        raise FileNotFoundError(
            f"Pipeline directory '{root}' has no {name}/ with a config (it holds: {present}). "
            "Is the download complete?"
        )
    return path


def read_config(path: str) -> dict[str, Any]:
    """The JSON config in `path` (a file, or a directory with config.json or
    scheduler_config.json), with a clear error for a missing or damaged file."""
    if os.path.isdir(path):
        for name in ("config.json", "scheduler_config.json"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"'{path}' has no config.json or scheduler_config.json.")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not valid JSON ({e}); the file is damaged.") from None
    if not isinstance(config, dict):
        raise ValueError(f"'{path}' holds a JSON {type(config).__name__}, not an object.")
    return config


def weights(model_dir: str, dtype: Any) -> Weights:
    """Lazy access to a component's safetensors (diffusers or transformers file names)."""
    stem = "model"
    for name in (f"{DIFFUSERS_STEM}.safetensors", f"{DIFFUSERS_STEM}.safetensors.index.json"):
        if os.path.exists(os.path.join(model_dir, name)):
            stem = DIFFUSERS_STEM
    return Weights(model_dir, dtype, stem=stem)
