"""Batches for training: the synthetic trace source (the packed store arrives with ``prepare``)."""
