"""Tools beside the request path: graph lint and golden I/O (these may import onnx), TensorRT
engine plans, benchmarks and evaluation."""
