"""Triton kernels for packed training, imported as ``soulchat.kernels``."""
