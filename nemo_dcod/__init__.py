"""nemo_dcod: distribution-corrected offline distillation (DisCorD) for NeMo 2 / Megatron-core."""

__version__ = "0.1.0.dev0"
