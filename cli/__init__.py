"""The ``peft-export`` command line (installed as the ``peft_export_cli`` package)."""
