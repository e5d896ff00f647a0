"""Torch-free inference: ONNX Runtime / TensorRT backends, evaluation, automatic segmentation."""
