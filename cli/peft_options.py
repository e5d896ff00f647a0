"""PEFT options shared by `finetune` and `merge` (one definition, same help everywhere)."""

from __future__ import annotations

import typer

from peft_export_cli import common

METHOD_HELP = ("PEFT method: lora, fact, ssf, adaptformer, attention, bias, layernorm, late_ft, frozen, full.")
BLOCKS_HELP = ("Encoder blocks that get the method: all, late:N (last N), late:50%, 6-11, 0,3,9. "
               "Indices count ViT blocks, or TinyViT's attention blocks.")

PEFT = typer.Option(None, "--peft", help=METHOD_HELP, rich_help_panel="PEFT")
BLOCKS = typer.Option(None, "--blocks", help=BLOCKS_HELP, rich_help_panel="PEFT")
RANK = typer.Option(None, "--rank", help="Rank (lora: 32, fact: 16 by default).", rich_help_panel="PEFT")
ALPHA = typer.Option(None, "--alpha", help="LoRA scale α (default 1, no α/r division, as in the study).",
                     rich_help_panel="PEFT")
TARGETS = typer.Option(None, "--targets", help="LoRA targets, comma-separated from q,k,v,mlp (default q,v).",
                       rich_help_panel="PEFT")
DROPOUT = typer.Option(None, "--dropout", help="Dropout (fact: 0.1; adaptformer: 0).", rich_help_panel="PEFT")
BOTTLENECK = typer.Option(None, "--bottleneck", help="AdaptFormer bottleneck width (default 64).",
                          rich_help_panel="PEFT")
ADAPTER_ALPHA = typer.Option(None, "--adapter-alpha", help="AdaptFormer α: 'learnable' (default) or a number.",
                             rich_help_panel="PEFT")
VARIANT = typer.Option(None, "--variant", help="AdaptFormer variant: study (with the +u residual, default) "
                       "or plain.", rich_help_panel="PEFT")
SSF_PATCH = typer.Option(None, "--ssf-patch-embed/--no-ssf-patch-embed",
                         help="SSF on the patch embedding too (default on).", rich_help_panel="PEFT")

_OPTION_OF = {"rank": ("lora", "fact"), "alpha": ("lora",), "targets": ("lora",), "dropout": ("fact", "adaptformer"),
              "bottleneck": ("adaptformer",), "adapter_alpha": ("adaptformer",), "variant": ("adaptformer",),
              "ssf_patch_embed": ("ssf",)}
_KEY = {"adapter_alpha": "alpha", "ssf_patch_embed": "patch_embed"}


def build_config(method: str, blocks: str | None, **given):
    """A PeftConfig from CLI values; options that do not apply to ``method`` are ignored with a warning."""
    from peft_export.peft import METHODS, PeftConfig
    from peft_export.peft.base import UsageError

    if method not in METHODS:
        raise UsageError(f"unknown PEFT method {method!r}; choose one of: {', '.join(METHODS)}")
    options = {}
    for name, value in given.items():
        if value is None:
            continue
        if method not in _OPTION_OF[name]:
            common.warn(f"--{name.replace('_', '-')} does not apply to {method}; ignored")
            continue
        options[_KEY.get(name, name)] = value
    config = PeftConfig(method, blocks or "all", options)
    METHODS[method](**options)  # validate now: one clear line for bad values
    return config
