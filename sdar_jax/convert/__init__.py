"""Conversions between Hugging Face checkpoints and sdar_jax params checkpoints.

  hf_rules.py        the rule table: the Hugging Face tensor of every parameter and the
                     pieces streamed, checked at import against the model's own tree
  safetensors_io.py  finding, reading and writing safetensors files
  from_hf.py         Hugging Face directory -> params checkpoint (streamed) or params
  to_hf.py           params checkpoint or params -> Hugging Face directory
  param_stores.py    a params checkpoint's arrays as tensorstores, read/written by region
  freed_memory.py    freed heap memory returned to the OS while streaming
  from_gguf.py       GGUF (llama.cpp) Llama files -> a Hugging Face directory

Params checkpoints themselves (save, load, check) live in `sdar_jax.checkpoint.params`.
Import from the modules (`from sdar_jax.convert.from_hf import hf_to_jax`).
"""
