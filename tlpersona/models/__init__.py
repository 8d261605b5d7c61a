"""Floor 1: the model a run reads its activations from.

- :mod:`tlpersona.models.gguf`: the embedded default model's fetch, and a GGUF file dequantised
  once into a cached HF directory;
- :mod:`tlpersona.models.loading`: a model spec resolved and loaded as an HF model and tokenizer
  wrapped in a TransformerBridge (:func:`~tlpersona.models.loading.load_model`), devices and
  dtypes;
- :mod:`tlpersona.models.layers`: which blocks a run reads (layer specs and their checks).
"""
