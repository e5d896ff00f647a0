"""The napari sample: the DSB2018 nuclei image of the ``samples`` extra (File > Open Sample > peft-export)."""

from __future__ import annotations

import numpy as np

from peft_export.data.samples import dsb2018
from peft_export.errors import PeftExportError


def dsb2018_sample() -> list[tuple]:
    """[(image, layer options, "image")]; without the ``samples`` extra: one notification and no layer."""
    try:
        image, _ = dsb2018()
    except PeftExportError as exc:
        from napari.utils.notifications import show_error

        show_error(str(exc))
        return []
    return [(np.array(image), {"name": "DSB2018 nuclei"}, "image")]
