"""Checkpoints for other serving engines, written from bitalloc's own codes: compressed-tensors, GPTQ."""
