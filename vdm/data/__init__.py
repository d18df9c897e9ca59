"""Data: moving digits, clip folders, tfds by name, latent caches, and the grain loader.

  digit_videos.py   moving-digit videos in pure numpy: labels, trajectories, rendering, and
                    `estimate_direction` (the direction of motion read back from pixels)
  moving_digits.py  the procedural text-video set as a tfds GeneratorBasedBuilder (array_record),
                    `prepare(config.data)`; `vdm.tools.moving_digits` previews it
  captions.py       caption templates / synonyms (train and held-out) and `parse_caption`
  folder.py         a directory of clips + captions.jsonl / captions.csv
  cache/            latent caches: format (manifest, records), source (`CacheSource`), build
                    (`build_cache`, frozen encoders injected; `vdm.tools.cache` is its command)
  sources.py        `get_source(config.data, split)`: the random-access source of data.source
  loader.py         `make_loader(config, split, batch_size=GLOBAL, ...)`: sharded, checkpointable
                    grain DataLoader yielding uint8 video batches, captions and labels

Imports: loader -> sources -> {moving_digits -> digit_videos -> captions, folder, cache.source ->
cache.format}; cache.build -> loader. The data layer takes trained weights as arguments and never
imports tasks, training, inference or the encoders' loaders. Submodules are imported on demand
(tensorflow_datasets and grain are slow to import).
"""
