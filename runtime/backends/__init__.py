"""Backends behind one protocol: ONNX Runtime and TensorRT."""
