"""Data: the moving-digits tfds builder, clip folders, tfds by name, and the grain pipeline.

  moving_digits.py  procedural text-video set (tfds GeneratorBasedBuilder, array_record), labels,
                    `prepare(config.data)`, `estimate_direction` for evaluation, preview CLI
  captions.py       caption templates / synonyms (train and held-out) and `parse_caption`
  folder.py         a directory of clips + captions.jsonl / captions.csv
  sources.py        `get_source(config.data, split)`: the random-access source of data.source
  pipeline.py       `make_loader(config, split, batch_size=GLOBAL, ...)`: sharded, checkpointable
                    grain DataLoader yielding uint8 video batches, captions and labels

Submodules are imported on demand (tensorflow_datasets and grain are slow to import).
"""
