"""Backends (ONNX Runtime, TensorRT) behind one session interface; never imports torch."""
