"""peft-export: parameter-efficient finetuning of SAM, exact merge, ONNX/TensorRT export, torch-free runtime.

Importing this package is cheap: no torch, no onnxruntime. Import the sub-packages you need:
``peft_export.models`` (SAM model zoo), ``peft_export.peft`` (PEFT methods and merge), ``peft_export.data``
(sample data and folder datasets, torch-free), ``peft_export.train``, ``peft_export.export``,
``peft_export.runtime`` (torch-free inference) and ``peft_export.bench``.
"""

__version__ = "0.1.0"

from peft_export.errors import PeftExportError

__all__ = ["PeftExportError", "__version__"]
