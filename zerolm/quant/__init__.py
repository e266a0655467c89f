"""Weight quantization: the codes and their math (formats), quantized layers (linear) and the
quantized matrix product (kernels). The transform that applies them is transforms/quantize.py."""
