"""The napari plugin: prompt, segment everything and correct with an export (or a bioimage.io package), torch-free.

Installed by the ``napari`` extra (``pip install 'peft-export[napari]'``); napari finds it through the npe2 manifest
``napari.yaml`` (entry point ``napari.manifest``). Every model call goes through the runtime's
:class:`~peft_export.runtime.segmenter.Segmenter` (``info``, ``set_image`` with ``on_tiles`` progress, ``predict``,
and ``strategy``/``segment`` for segment everything, as ``predict --auto``): no second inference path. Modules:
:mod:`.core` (no Qt: opening a model, prompts from layer data, saving), :mod:`.widget` (the dock widget),
:mod:`.sample` (the DSB2018 sample image).
"""
