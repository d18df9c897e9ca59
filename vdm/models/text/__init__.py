"""Our linen implementations of Hugging Face text encoders, one file per family.

transformers 5 has no Flax models, so the modules are written here and load the PyTorch
checkpoints' safetensors weights (PyTorch `Linear` weights are stored (out, in) and are transposed
on load). The public entry point is `vdm.models.text.encoder.load_text_encoder`; this package holds
the building blocks:

  layers.py  attention, MLP, norms, activations and the torch -> flax weight helpers
  bert.py    BERT encoders (all-MiniLM-L6-v2, the offline default)
  t5.py      T5 / mT5 (one shared relative position bias) and UMT5 (one per layer) encoders
  clip.py    the CLIP text transformer (causal mask, final layer norm)
  weights.py reading safetensors (single or sharded) into numpy
  hub.py     where a model's files are: aliases, local directories, hub ids
  encoder.py `TextEncoder` (tokenizer + module + params) and `load_text_encoder`
  architectures.py  known architectures without weights (abstract encoders for AOT)
"""
