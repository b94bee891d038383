"""Checkpoints in and out: Hugging Face -> NeMo 2 import, NeMo 2 -> Hugging Face / plain NeMo 2 export.

* :mod:`~nemo_dcod.convert.architectures` - supported families, HF config -> NeMo config;
* :mod:`~nemo_dcod.convert.coverage` - NeMo's weight mapping made complete (local-spec norm
  names) and checked (every source tensor consumed, every target tensor written);
* :mod:`~nemo_dcod.convert.hf_import` - ``nemo-dcod import`` through ``llm.import_ckpt``;
* :mod:`~nemo_dcod.convert.hf_export` - ``nemo-dcod export`` through ``llm.export_ckpt``;
* :mod:`~nemo_dcod.convert.verify` - logit parity of the two sides;
* :mod:`~nemo_dcod.convert.staging` - outputs appear complete or not at all.
"""
