"""The ``train`` stage: config schema, NeMo trainer assembly, metrics, checkpoint choice."""
