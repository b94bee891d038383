"""The NeMo model plug-in: our loss as the model's loss reduction, data/forward steps, model families.

Import the submodules directly (``nemo_dcod.model.gpt``, ``.reduction``, ``.steps``, ``.families``,
``.megatron_loss``): importing this package does not import NeMo.
"""
