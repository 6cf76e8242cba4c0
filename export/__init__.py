"""Torch side: model loading, family adapters, the PyTorch DyVTE reference and ONNX export."""
