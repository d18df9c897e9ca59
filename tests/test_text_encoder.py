"""Text encoders: parity with transformers' PyTorch models, tokenization, errors, sharding.

What the parity tests cover:
  * MiniLM (BERT): the real offline weights, tokenized prompts, against `BertModel` (torch) live,
    against the committed `tests/data/minilm_reference.npz` (torch outputs, runs without torch),
    and in float64 (exactness of the architecture, independent of float32 rounding).
  * T5 v1.1, T5 v1.0, UMT5, CLIP (quick_gelu and gelu): tiny *random* torch models built from a
    config, saved with `save_pretrained` (safetensors) next to a copy of the MiniLM tokenizer files,
    loaded with `load_text_encoder(dir)` and run on the same tokenized prompts as torch. This covers
    the whole load path (AutoConfig, family registry, weight conversion, AutoTokenizer) and the
    modules' math; it does not cover those families' own tokenizers (none are available offline).

Regenerate the reference array (needs torch):
  PYTHONPATH=. python tests/test_text_encoder.py --write-reference
"""

import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import BertConfig, GPT2Config

from vdm.models.text import encoder as te
from vdm.models.text import hub
from vdm.models.text import t5 as t5_lib

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "minilm_reference.npz")
REFERENCE_PROMPTS = [
    "",
    "a 7 moving left",
    "two digits bouncing around a black square, slowly",
    "the digit three drifts up and to the right while a small five spins in the lower corner",
]
REFERENCE_LENGTH = 16  # the last prompt is longer: its reference is the truncated encoding.
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
PARITY_PROMPTS = [
    "",
    "a 7 moving left",
    "one two three four five six seven eight nine ten eleven twelve thirteen",  # 15 tokens
]


@pytest.fixture(scope="module")
def tiny_bert():
    return te.tiny_text_encoder(jax.random.key(2), dim=32, num_layers=1, num_heads=4, max_length=8)


@pytest.fixture(scope="module")
def minilm():
    return te.load_text_encoder("minilm", max_length=REFERENCE_LENGTH)


def _torch_bert(dtype="float32"):
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    model = BertModel.from_pretrained(hub.resolve_model_dir("minilm")[0]).eval()
    return torch, (model.double() if dtype == "float64" else model)


def _torch_hidden(torch, model, ids, mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    return out.last_hidden_state.numpy()


def test_minilm_matches_committed_reference(minilm):
    ref = np.load(REFERENCE)
    assert list(ref["prompts"]) == REFERENCE_PROMPTS
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = minilm.tokenize(REFERENCE_PROMPTS)
    np.testing.assert_array_equal(ids, ref["ids"])
    np.testing.assert_array_equal(mask, ref["mask"])
    hidden = np.asarray(minilm.encode(minilm.params, ids, mask))
    err = np.abs(hidden - ref["hidden"]).max()
    assert err <= 1e-4, f"max abs error vs committed torch reference: {err:.3g}"


def test_minilm_parity_with_torch_bert(minilm):
    torch, model = _torch_bert()
    ids, mask = minilm.tokenize(PARITY_PROMPTS)
    hidden, mask_out = minilm(PARITY_PROMPTS)
    expected = _torch_hidden(torch, model, ids, mask)
    err = np.abs(np.asarray(hidden) - expected)
    print(f"minilm float32: max abs err {err.max():.3g} (tokens {err[mask == 1].max():.3g})")
    assert err.max() <= 1e-4
    np.testing.assert_array_equal(np.asarray(mask_out), mask)
    # The committed reference really is torch's output (not ours). It was written in float32 on
    # another CPU: float32 BERT on other kernels (AVX2 vs AVX-512) differs from it by up to ~3.3e-5,
    # and torch in float64 by 2.6e-5, so the bound is float32 rounding, half our parity bound.
    ref = np.load(REFERENCE)
    assert np.abs(_torch_hidden(torch, model, ref["ids"], ref["mask"]) - ref["hidden"]).max() < 5e-5


def test_minilm_float64_is_exact():
    """In float64 the only difference left is rounding: the architecture matches exactly."""
    torch, model = _torch_bert("float64")
    with jax.enable_x64(True):
        enc = te.load_text_encoder("minilm", max_length=12, dtype=jnp.float64)
        ids, mask = enc.tokenize(PARITY_PROMPTS[:2])
        hidden = np.asarray(enc.encode(enc.params, ids, mask))
    assert hidden.dtype == np.float64
    err = np.abs(hidden - _torch_hidden(torch, model, ids, mask)).max()
    assert err < 1e-9, err


def test_relative_position_buckets_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    for length, num_buckets, max_distance in [(300, 32, 128), (40, 8, 12), (64, 32, 16)]:
        pos = torch.arange(length)
        expected = T5Attention._relative_position_bucket(
            pos[None, :] - pos[:, None], True, num_buckets, max_distance
        ).numpy()
        got = t5_lib.relative_position_buckets(length, num_buckets, max_distance)
        np.testing.assert_array_equal(got, expected)


def _tiny_torch_model(kind):
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    # Small bucket counts and distances so the log-spaced buckets and the clamp are exercised at
    # L = 24; vocab covers the MiniLM tokenizer used to make the ids.
    t5 = dict(
        vocab_size=30522,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=12,
    )
    clip = dict(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
    )
    builders = {
        "t5-v1.1": lambda: T5EncoderModel(T5Config(**t5, feed_forward_proj="gated-gelu")),
        "t5-v1.0": lambda: T5EncoderModel(T5Config(**t5, feed_forward_proj="relu")),
        "umt5": lambda: UMT5EncoderModel(UMT5Config(**t5)),
        "clip-quick_gelu": lambda: CLIPTextModel(CLIPTextConfig(**clip, hidden_act="quick_gelu")),
        "clip-gelu": lambda: CLIPTextModel(CLIPTextConfig(**clip, hidden_act="gelu")),
    }
    return builders[kind]().eval()


@pytest.mark.parametrize("kind", ["t5-v1.1", "t5-v1.0", "umt5", "clip-quick_gelu", "clip-gelu"])
def test_tiny_hf_model_parity(kind, tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = _tiny_torch_model(kind)
    # Checkpoint variants ride along: UMT5 in the diffusers layout (text_encoder/ + tokenizer/),
    # T5 v1.0 as a sharded checkpoint (index json + shards), CLIP-gelu with bfloat16 weights
    # (torch then runs the same bf16-rounded weights in float32).
    model_dir = tmp_path / "text_encoder" if kind == "umt5" else tmp_path
    tok_dir = tmp_path / "tokenizer" if kind == "umt5" else tmp_path
    if kind == "clip-gelu":
        model.to(torch.bfloat16).save_pretrained(model_dir)
        model = model.float()
    else:
        model.save_pretrained(model_dir, max_shard_size="100KB" if kind == "t5-v1.0" else "5GB")
    if kind == "t5-v1.0":
        assert (model_dir / "model.safetensors.index.json").exists()
    tok_dir.mkdir(exist_ok=True)
    minilm_dir = hub.resolve_model_dir("minilm")[1]
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(minilm_dir, name), tok_dir / name)

    enc = te.load_text_encoder(str(tmp_path), max_length=24)
    assert enc.dim == 32
    hidden, mask = enc(PARITY_PROMPTS)
    expected = _torch_hidden(torch, model, *enc.tokenize(PARITY_PROMPTS))
    err = np.abs(np.asarray(hidden) - expected)
    print(f"{kind}: max abs err {err.max():.3g}, output scale {np.abs(expected).max():.3g}")
    assert err.max() <= 1e-4
    if kind == "umt5":  # one learned bias per layer, not one shared.
        assert all("relative_attention_bias" in enc.params[f"layer_{i}"] for i in range(2))
    elif kind.startswith("t5"):
        assert "relative_attention_bias" not in enc.params["layer_1"]


def test_truncation_warns_and_keeps_static_shape(minilm):
    long_prompt = "a digit moves " * 20
    with pytest.warns(UserWarning) as record:
        ids, mask = minilm.tokenize([long_prompt, "ok"])
    messages = [str(w.message) for w in record]
    assert len(messages) == 1  # only the long prompt.
    assert "a digit moves" in messages[0] and "max_length=16" in messages[0]
    assert "62 tokens" in messages[0]  # 20 * 3 words + [CLS] + [SEP]
    assert ids.shape == mask.shape == (2, REFERENCE_LENGTH) and ids.dtype == np.int32
    assert ids[0, -1] == minilm.tokenizer.sep_token_id  # truncation keeps [SEP] last.
    assert mask[0].sum() == REFERENCE_LENGTH and mask[1].sum() == 3


def test_null_embedding_is_the_empty_prompt(minilm):
    hidden, mask = minilm.null_context(2)
    ids, _ = minilm.tokenize([""])
    tok = minilm.tokenizer
    assert ids[0, :3].tolist() == [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]
    assert hidden.shape == (2, REFERENCE_LENGTH, 384) and mask.shape == (2, REFERENCE_LENGTH)
    assert np.asarray(mask).sum(axis=1).tolist() == [2, 2]
    np.testing.assert_array_equal(np.asarray(hidden[0]), np.asarray(hidden[1]))
    other, _ = minilm(["a 7 moving left"])
    assert np.abs(np.asarray(other[0, 0] - hidden[0, 0])).max() > 1e-2


@pytest.mark.parametrize("family", ["bert", "t5", "umt5", "clip_text_model"])
def test_tiny_encoder_jit_shape_and_dtype(family):
    enc = te.tiny_text_encoder(
        jax.random.key(1),
        dim=32,
        num_layers=1,
        num_heads=2,
        max_length=8,
        family=family,
        dtype=jnp.bfloat16,
    )
    ids, mask = enc.tokenize(["a 7 moving left", "", "a 3"])
    hidden = jax.jit(enc.encode)(enc.params, ids, mask)
    assert hidden.shape == (3, 8, 32) and hidden.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(enc.params))
    assert np.isfinite(np.asarray(hidden, np.float32)).all()


def test_encode_is_frozen(tiny_bert):
    ids, mask = tiny_bert.tokenize(["a 7 moving left"])
    grads = jax.grad(lambda p: tiny_bert.encode(p, ids, mask).sum())(tiny_bert.params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_errors_name_the_input(tmp_path, tiny_bert):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        te.load_text_encoder(missing)
    with pytest.raises(FileNotFoundError, match="hub"):  # offline: no hub access.
        te.load_text_encoder("some-org/some-text-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        te.load_text_encoder(str(tmp_path))
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' is not supported") as e:
        te.load_text_encoder(str(tmp_path / "gpt2"))
    for name in ("'bert'", "'t5'", "'umt5'", "'clip_text_model'"):
        assert name in str(e.value)
    BertConfig(hidden_size=8, num_attention_heads=2).save_pretrained(tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="No model.safetensors"):
        te.load_text_encoder(str(tmp_path / "no_weights"))
    with pytest.raises(ValueError, match="max_length=600"):
        te.load_text_encoder("minilm", max_length=600)  # BERT's position table has 512.
    with pytest.raises(TypeError, match="list of prompts"):
        tiny_bert.tokenize("one prompt")


def test_shard_params_by_logical_axes(tiny_bert):
    from configs.base import get_config

    enc = tiny_bert
    devices = np.array(jax.devices()[:8]).reshape(1, 2, 4)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    sharded = enc.shard(mesh, get_config().mesh.logical_axis_rules)
    P = jax.sharding.PartitionSpec
    query = sharded.params["layer_0"]["attention"]["query"]["kernel"]  # [embed, heads, kv]
    assert query.sharding.spec == P("fsdp", "tensor", None)
    assert sharded.params["layer_0"]["mlp"]["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
    ids, mask = enc.tokenize(["a 7 moving left"])
    np.testing.assert_allclose(
        np.asarray(sharded.encode(sharded.params, ids, mask)),
        np.asarray(enc.encode(enc.params, ids, mask)),
        atol=1e-5,
    )


def write_reference(path: str = REFERENCE) -> None:
    """Writes torch BertModel's float32 hidden states for REFERENCE_PROMPTS (about 100 KB)."""
    torch, model = _torch_bert()
    enc = te.load_text_encoder("minilm", max_length=REFERENCE_LENGTH)
    ids, mask = enc.tokenize(REFERENCE_PROMPTS)
    hidden = _torch_hidden(torch, model, ids, mask).astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(
        path, prompts=np.array(REFERENCE_PROMPTS), ids=ids, mask=mask, hidden=hidden
    )
    print(f"wrote {path}: hidden {hidden.shape}, {os.path.getsize(path) / 1024:.0f} KB")


if __name__ == "__main__":
    if "--write-reference" in sys.argv:
        write_reference()
    else:
        print(__doc__)


_HIDE_TORCH = """
import importlib.util
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a, **k: None if n.split(".")[0] == "torch" else find_spec(
    n, *a, **k
)
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_torch_free_install_gets_no_pytorch_notice(quiet):
    """vdm needs no torch: importing transformers through vdm does not print transformers'
    "PyTorch was not found" notice (simulated torch-free environment; the test extra has torch).
    The unmuted case shows the simulation really triggers the notice."""
    import subprocess

    code = _HIDE_TORCH + (
        "from vdm.models.text import encoder as te; te.import_transformers()"
        if quiet
        else "import transformers"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert ("PyTorch was not found" in out.stderr) is not quiet, out.stderr


FAST_PROMPTS = [
    "", " ", "a 7 moving left", "A HANDWRITTEN Four drifting UP", "naïve café, Ünïcödé", "中文 字",
    "[CLS] x [SEP] [MASK] [PAD] [UNK]", "emoji 😀 tab\tnewline\n", "\x00\x07 control", "x" * 150,
    "supercalifragilisticexpialidocious " * 4, "a digit moves " * 20, "##ing don't (3) {4}!",
]  # fmt: skip


def test_fast_tokenizer_and_config_equal_transformers():
    """MiniLM's tokenizer.json through `tokenizers` alone gives transformers' token ids and masks
    (untruncated, and padded / truncated to several lengths) and special tokens; its config.json
    read with json builds the same module as AutoConfig's."""
    from transformers import AutoConfig, AutoTokenizer

    from vdm.models.text import fast

    path = hub.minilm_path()
    tok, ref = fast.load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert isinstance(tok, fast.Tokenizer)
    for length in (4, 16, 64):
        kw = dict(padding="max_length", truncation=True, max_length=length, return_tensors="np")
        got, want = tok(FAST_PROMPTS, **kw), ref(FAST_PROMPTS, **kw)
        for key in ("input_ids", "attention_mask"):
            np.testing.assert_array_equal(got[key], want[key])
    full = dict(truncation=False, verbose=False)
    assert tok(FAST_PROMPTS, **full)["input_ids"] == ref(FAST_PROMPTS, **full)["input_ids"]
    for name in ("cls_token_id", "sep_token_id", "pad_token_id", "unk_token_id", "eos_token"):
        assert getattr(tok, name) == getattr(ref, name), name
    assert len(tok) == len(ref)
    config = fast.read_config(path)
    module = te.build_module(config, jnp.float32, None)
    assert not config.missing
    assert module == te.build_module(AutoConfig.from_pretrained(path), jnp.float32, None)


def test_fast_path_falls_back_to_transformers(tmp_path):
    """A tokenizer_config.json that asks for anything tokenizer.json does not say, or a config.json
    without a field the module reads, goes through transformers (which knows the defaults)."""
    import json

    from vdm.models.text import fast

    src = hub.minilm_path()
    for name in (*TOKENIZER_FILES, "config.json"):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    with open(tmp_path / "tokenizer_config.json") as f:
        tok_config = json.load(f)
    for change in ({"padding_side": "left"}, {"do_lower_case": False}, {"add_bos_token": True}):
        with open(tmp_path / "tokenizer_config.json", "w") as f:
            json.dump({**tok_config, **change}, f)
        assert fast.load_tokenizer(str(tmp_path)) is None, change
        assert not isinstance(te.load_tokenizer(str(tmp_path)), fast.Tokenizer)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    del config["layer_norm_eps"]  # BertConfig's default: 1e-12
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    hf_config, module = te._read_config(str(tmp_path), jnp.float32, None)
    assert not isinstance(hf_config, fast._Config) and module.layer_norm_eps == 1e-12


def test_minilm_loads_without_transformers_or_torch():
    import subprocess

    code = (
        "import sys; from vdm.models.text import encoder as te; "
        "enc = te.load_text_encoder('minilm', max_length=8); enc(['a 7 moving left']); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'torch'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
