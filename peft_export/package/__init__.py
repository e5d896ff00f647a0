"""Sharing exports: bioimage.io model packages with ONNX weights (``peft-export package``).

Needs the optional extra ``peft-export[bioimageio]`` (bioimageio.spec to write the description, bioimageio.core
to validate it). Running a package needs neither: :mod:`peft_export.runtime.package`.
"""

from __future__ import annotations

from peft_export.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "PackageOptions": "options", "PackageResult": "bioimageio", "build_package": "bioimageio",
    "validate_package": "bioimageio"})
