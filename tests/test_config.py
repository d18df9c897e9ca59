import os
import re
import subprocess
import sys

import pytest

from vdm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "base.py")


def test_load_and_override():
    c = config_lib.load_config(BASE, ["model.depth=3", "--config.train.batch_size=4"])
    assert c.model.depth == 3 and c.train.batch_size == 4
    c = config_lib.load_config(BASE, {"optim.learning_rate": 1})  # int -> float field is fine
    assert c.optim.learning_rate == 1.0 and isinstance(c.optim.learning_rate, float)


def test_unknown_key_names_closest():
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.depht.*config\.model\.depth"):
        config_lib.load_config(BASE, ["model.depht=3"])
    with pytest.raises(config_lib.ConfigError, match=r"config\.train\.num_steps"):
        config_lib.load_config(BASE, ["trian.num_steps=3"])


def test_wrong_type_and_choice():
    with pytest.raises(config_lib.ConfigError, match=r"model\.depth is a int"):
        config_lib.load_config(BASE, ["model.depth=abc"])
    with pytest.raises(config_lib.ConfigError, match=r"stage='decoder' is not one of"):
        config_lib.load_config(BASE, ["stage=decoder"])
    with pytest.raises(config_lib.ConfigError, match=r"num_frames=16 is not 1 \+ k"):
        config_lib.load_config(BASE, ["data.num_frames=16"])


def test_required_fields_present_in_every_config():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py") and not name.startswith("_"):
            config_lib.load_config(os.path.join(ROOT, "configs", name))


def test_cli_typo_exits_with_message(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            f"--config={BASE}",
            f"--workdir={tmp_path}",
            "--config.model.depht=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "Did you mean: config.model.depth" in out.stderr
    assert "Traceback" not in out.stderr


def test_placeholder_fields_and_diffusion_validation():
    c = config_lib.load_config(BASE, ["vae.base_channels=48", "vae.channel_multipliers=[1,2]"])
    assert c.vae.base_channels == 48 and c.vae.channel_multipliers == (1, 2)
    with pytest.raises(config_lib.ConfigError, match=r"vae\.base_channels is a int"):
        config_lib.load_config(BASE, ["vae.base_channels=abc"])
    # A resolution shift only exists for flow; asking for it with eps fails at load time.
    with pytest.raises(config_lib.ConfigError, match=r"config\.diffusion"):
        config_lib.load_config(BASE, ["diffusion.objective=eps", "diffusion.shift=3.0"])
    # The sampling shift (a typed placeholder: unset = the training one) is checked the same way.
    assert config_lib.load_config(BASE, ["sample.shift=3"]).sample.shift == 3.0
    with pytest.raises(config_lib.ConfigError, match=r"config\.sample: sample\.shift=-1\.0"):
        config_lib.load_config(BASE, ["sample.shift=-1.0"])


def test_compilation_cache_location_and_switch(tmp_path, monkeypatch):
    """The mains keep compiled programs in a user cache directory; an env var moves or disables
    it, and a program compiled with the cache on lands there (checked in a fresh process)."""
    import subprocess
    import sys

    from vdm import cli

    for var in ("VDM_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.compilation_cache_dir() == str(tmp_path / "xdg" / "vdm" / "jax")
    monkeypatch.setenv("VDM_COMPILATION_CACHE", "off")
    assert cli.compilation_cache_dir() is None
    script = (
        "from vdm import cli; cli.enable_compilation_cache(); import jax, jax.numpy as jnp; "
        "jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((32, 32))).block_until_ready()"
    )
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    for setting in ("off", str(tmp_path / "cache")):
        env["VDM_COMPILATION_CACHE"] = setting
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    assert not os.path.exists(tmp_path / "xdg")  # off: nothing written, not even the default
    assert os.listdir(tmp_path / "cache")  # on: the compiled program is there


def test_numbers_that_can_only_be_wrong_are_refused_where_they_enter():
    """Non-finite numbers anywhere, negative counts and rates, and zero sizes are config errors
    naming the field (not a ZeroDivisionError later, or a run that trains nothing and exits 0)."""
    for override, message in (
        ("train.num_steps=-5", "train.num_steps=-5 must not be negative"),
        ("data.fps=0", "data.fps=0 must be positive"),
        ("sample.guidance=nan", "sample.guidance=nan is not a finite number"),
        ("optim.learning_rate=inf", "optim.learning_rate=inf is not a finite number"),
        ("sample.eta=-1.0", "sample.eta=-1.0 must not be negative"),
        ("train.batch_size=0", "train.batch_size=0 must be positive"),
    ):
        with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
            config_lib.load_config(BASE, [override])
    assert config_lib.load_config(BASE, ["diffusion.logit_mean=-0.5", "seed=-3"]).seed == -3
