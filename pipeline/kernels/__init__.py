"""GPU kernels for the 4-bit layers; pipeline/quantization/numerics.py stays the oracle they match."""
