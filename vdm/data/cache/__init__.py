"""A latent cache: VAE posteriors and text-encoder contexts precomputed once for the denoiser.

Training the denoiser would otherwise re-encode every video with the frozen VAE and every caption
with the frozen text encoder at every step (on CPU as costly as the denoiser itself). Build the
cache once per split, then train from it:

  python -m vdm.tools.cache --config configs/quickstart.py --output /data/dq --split train
  python -m vdm.tools.cache --config configs/quickstart.py --output /data/dq --split test
  python train.py --config configs/quickstart.py --workdir wd --config.data.source=cache:/data/dq

  format.py  the on-disk format: manifest (read, write, compatibility with a config), record
             codec, file names
  source.py  `CacheSource`, the random-access grain source of `config.data.source="cache:DIR"`
  build.py   `build_cache(config, split, output, encoders=...)`: encodes a split with the frozen
             encoders it is given (the data layer never loads them itself; `vdm.tools.cache` does)

This package exports the reading side; the builder is `vdm.data.cache.build.build_cache` (it reads
its input through `vdm.data.loader`, which reads caches through this package).
"""

from vdm.data.cache.format import (
    CACHE_FIELDS,
    FORMAT,
    MANIFEST,
    NULL_CONTEXT,
    VERSION,
    check_compatible,
    load_null_context,
    manifest_path,
    pack_record,
    read_manifest,
    split_file,
    underlying_source,
    unpack_record,
)
from vdm.data.cache.source import CacheSource

__all__ = [
    "CACHE_FIELDS",
    "FORMAT",
    "MANIFEST",
    "NULL_CONTEXT",
    "VERSION",
    "CacheSource",
    "check_compatible",
    "load_null_context",
    "manifest_path",
    "pack_record",
    "read_manifest",
    "split_file",
    "underlying_source",
    "unpack_record",
]
