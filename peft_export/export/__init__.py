"""ONNX export of merged SAM models, with a parity gate; TensorRT engines."""
