"""Wan prompt encoding equals diffusers' WanPipeline (UMT5 + its zero padding), read from the
Diffusers-format pipeline directory (text_encoder/ + tokenizer/) without torch."""

import numpy as np
import pytest
import torch
import wan_tiny

from vdm.models.wan import files
from vdm.models.wan import text as wan_text

PROMPTS = [
    "a cat walks on the grass",
    "  a red   car &amp;amp; a dog\n at night ",  # cleaned: entities unescaped, spaces collapsed
    "",
    "zebra quokka unseen words",  # unknown pieces -> <unk>
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wan") / "Wan-tiny")
    return path, wan_tiny.save_pipeline(path)


def test_prompt_embeddings_equal_diffusers(tiny):
    path, pipe = tiny
    enc = wan_text.load_text_encoder(path, max_length=32)
    got = np.asarray(wan_text.encode_prompts(enc, PROMPTS))
    with torch.no_grad():
        want = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=32).numpy()
    assert got.shape == want.shape == (4, 32, 32)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"Wan prompt embeddings: max relative error {err:.2e}")
    assert err <= 1e-5
    lengths = (np.abs(want).sum(-1) > 0).sum(-1)
    assert list(lengths) == [int(n) for n in (np.abs(got).sum(-1) > 0).sum(-1)]
    assert lengths.min() >= 1 and lengths.max() < 32  # "" is "</s>" alone; padding is zero


def test_prompt_clean_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for p in PROMPTS + ["tab\tand&lt;b&gt;", "ünïcode  ok"]:
        assert wan_text.prompt_clean(p) == prompt_clean(p)


def test_pipeline_dir_errors_name_the_problem(tmp_path, tiny):
    path, _ = tiny
    assert files.pipeline_dir(path) == path
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        files.pipeline_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no vae_x/"):
        files.component_dir(path, "vae_x")
    assert files.read_config(files.component_dir(path, "scheduler"))["_class_name"] == (
        "UniPCMultistepScheduler"
    )
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        files.read_config(str(bad))
