"""Sharing exports: bioimage.io model packages with ONNX weights (``peft-export package``).

Needs the optional extra ``peft-export[bioimageio]`` (bioimageio.spec to write the description, bioimageio.core
to validate it). Running a package needs neither: :mod:`peft_export.runtime.package`.
"""

from peft_export.package.bioimageio import PackageOptions, PackageResult, build_package, validate_package

__all__ = ["PackageOptions", "PackageResult", "build_package", "validate_package"]
