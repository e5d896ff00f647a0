"""The ``package`` command's options (torch-free, bioimageio-free: the command line shows them without loading
either)."""

from __future__ import annotations

from peft_export.options import Options, option


class PackageOptions(Options):
    """What a bioimage.io package says about itself, and its gates."""

    family = "package"
    panel = "Package"

    authors: list[str] = option([], "An author (the package's creator and contact); repeat for several. Required.",
                                cli="--author", repeat=True)
    github_user: str | None = option(None, "The first author's GitHub user name (the zoo contacts maintainers "
                                     "through GitHub).")
    name: str | None = option(None, "Package name (letters, digits, spaces, _+-()).",
                              default_text="from the model and its PEFT method")
    license: str | None = option(None, "SPDX licence of the weights.", default_text="the base weights' licence, "
                                 "Apache-2.0 for SAM, MobileSAM and LiteMedSAM")
    tags: list[str] = option([], "Extra tag; repeat for several.", cli="--tag", repeat=True)
    test_image: str | None = option(None, "Image for the test tensors (its central square, resized to the model "
                                    "input).", default_text="the DSB2018 validation tile (sample:dsb2018)")
    allow_unverified: bool = option(False, "Package an export made with --no-verify (the README says it was not "
                                    "parity-checked).", cli="--allow-unverified")
    validate_package: bool = option(True, "Run bioimageio.core's test of the package before writing it "
                                    "(--no-validate skips it; the package's own reproduction check still runs).",
                                    cli="--validate/--no-validate")
    force: bool = option(False, "Overwrite the output if it exists.", cli=False)  # the command's I/O flag
