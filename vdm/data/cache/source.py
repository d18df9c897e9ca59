"""`CacheSource`: one split of a latent cache as a grain random-access source."""

from __future__ import annotations

import os

from vdm.data import provenance
from vdm.data.cache import format as fmt
from vdm.errors import ConfigError


class CacheSource:
    """Random-access source over one split of a latent cache (`config.data.source="cache:DIR"`).

    Records are the dicts described in `vdm.data.cache.format`. The source holds no video, so
    `vdm.data.loader` skips its video crops for it (`provides_video = False`). Records that the
    exclusion lists of `data_config` name (by the hashes and ids the cache stored when it was
    built, `vdm.data.provenance`) are not served, also when the lists are newer than the cache.

    Args:
      path: the cache directory.
      split: a cached split name.
      data_config: `config.data` of the consumer; when given, its num_frames / height / width
        must be those the cache was built with (the rest is checked by `check_compatible`).
    """

    provides_video = False

    def __init__(self, path: str, split: str, data_config=None):
        self._path = os.path.abspath(os.path.expanduser(str(path)))
        self._split = split
        manifest = fmt.read_manifest(self._path)
        if split not in manifest["splits"]:
            raise ValueError(
                f"Latent cache '{self._path}' has no split {split!r}; cached: "
                f"{sorted(manifest['splits'])}. Build it: {fmt.BUILD_COMMAND} --config ... "
                f"--output {self._path} --split {split}"
            )
        if data_config is not None:
            found = {k: manifest["data"][k] for k in ("num_frames", "height", "width")}
            wanted = {k: int(data_config[k]) for k in found}
            if found != wanted:
                raise ValueError(
                    f"Latent cache '{self._path}' was built for videos {found}, but config.data "
                    f"asks for {wanted}. Rebuild the cache with this config or set "
                    f"config.data.num_frames/height/width to the cached values."
                )
        entry = manifest["splits"][split]
        self._features = entry["features"]
        self._file = fmt.member(self._path, entry["file"])
        self._len = int(entry["num_examples"])
        self._reader = None
        if not os.path.isfile(self._file):
            raise FileNotFoundError(
                f"Latent cache '{self._path}' lists split {split!r} but '{self._file}' is "
                "missing; rebuild that split."
            )
        self.selection = self._select(data_config or {})
        self._keep = None if self.selection is None else self.selection.keep.tolist()

    def _select(self, data_config) -> provenance.Selection | None:
        manifest = provenance.read_manifest(
            os.path.join(self._path, fmt.provenance_file(self._split))
        )
        if manifest is None:
            if provenance.Exclusions.from_config(data_config).names:
                raise ConfigError(
                    f"Latent cache '{self._path}' was built without a data manifest, so "
                    "config.data.exclude cannot be honoured for it. Rebuild the cache "
                    f"({fmt.BUILD_COMMAND}) with this code."
                )
            return None
        if manifest["num_examples"] != self._len:
            raise ConfigError(
                f"Latent cache '{self._path}': its {fmt.provenance_file(self._split)} lists "
                f"{manifest['num_examples']} examples, the split holds {self._len}; rebuild it."
            )
        return provenance.select(manifest, data_config, what=f"Latent cache {self._path}")

    def _index(self, index: int) -> int:
        return index if self.selection is None else self._keep[index]

    @property
    def features(self) -> dict:
        """{name: {"dtype": str, "shape": list}} of every record field ("str" for text)."""
        return self._features

    def _source(self):
        if self._reader is None:
            import grain  # slow to import; only readers need it

            self._reader = grain.sources.ArrayRecordDataSource([self._file])
        return self._reader

    def __len__(self) -> int:
        return self._len if self.selection is None else len(self.selection.keep)

    def __repr__(self) -> str:
        return f"CacheSource(path={self._path!r}, split={self._split!r}, n={len(self)})"

    def __getitem__(self, index: int) -> dict:
        return fmt.unpack_record(self._source()[self._index(index)], self._features)

    def __getitems__(self, indices) -> list[dict]:
        records = self._source().__getitems__([self._index(i) for i in indices])
        return [fmt.unpack_record(r, self._features) for r in records]

    def __getstate__(self):
        # Workers reopen the file themselves (readers hold native handles).
        state = dict(self.__dict__)
        state["_reader"] = None
        return state
