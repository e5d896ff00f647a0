"""Shared fixtures. Tiny random-weight models for structure, the real LiteMedSAM weights for quality."""

from __future__ import annotations

import os

import numpy as np
import pytest

from peft_export._malloc import tune_malloc

tune_malloc()
os.environ.setdefault("PEFT_EXPORT_NO_COLOR", "1")


def pytest_configure(config):
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def lite_medsam():
    """LiteMedSAM with the real weights (eval mode). Shared: tests must not modify it."""
    from peft_export.models.loading import load_model

    return load_model("lite_medsam").model


@pytest.fixture(scope="session")
def dsb_val():
    from peft_export.data.dataset import load_samples

    return load_samples("sample:dsb2018", "val")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    from peft_export_cli.app import main

    def _run(*args: str):
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run
