"""qat_runner: declarative quantization-aware training of PyTorch models."""
__version__ = "0.1.0"
