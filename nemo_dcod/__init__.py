"""nemo_dcod: distribution-corrected offline distillation (DisCorD) for NeMo 2 / Megatron-core."""

from nemo_dcod.parallel.numpy_compat import restore_np_product

__version__ = "0.1.0.dev0"

# megatron-core 0.15.3's distributed checkpointing calls np.product, gone in numpy 2: put it back
# before any of our processes builds a model (nemo_dcod/parallel/numpy_compat.py).
restore_np_product()
