"""Test setup: 8 fake CPU devices (so sharding, pmap and sharded checkpoints are exercised on a
laptop), set before jax is imported anywhere."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The test extra installs libtpu (tests/test_aot.py compiles for TPU topologies). Tests run on the
# CPU backend; several pytest workers may load libtpu's compiler at once (it takes a lockfile).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The CLIs the tests run keep no compiled programs in the user's cache directory (vdm.cli); the
# cache itself is tested on its own (tests/test_config.py).
os.environ.setdefault("VDM_COMPILATION_CACHE", "off")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
