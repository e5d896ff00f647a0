"""PEFT options: each declared once, typed, with its help, in one options class per method.

    class LoRAOptions(PeftOptions):
        rank: int = option(32, "rank r of A (r×D) and B (D×r)", ge=1)

Everything else is derived from these classes (as Hugging Face peft derives from ``LoraConfig``'s fields):

- the method's defaults and validation (:func:`parse_options`: one clear error line);
- the command-line options of ``finetune``, ``merge`` and ``merge-and-export`` with their help and the methods
  each applies to (:func:`cli_options`). The option's name is ``--<field>`` unless the declaration names
  another (``cli="--adapter-alpha"``); a bool becomes a ``--x/--no-x`` pair. Methods may share an option
  (``--rank``: lora and fact) when its type agrees;
- the training-configuration fields and YAML keys (the CLI name with underscores: ``rank``, ``adapter_alpha``),
  and how configuration values become a method's options (:func:`peft_config_from`: an option given for a
  method it does not apply to is ignored with a warning).

Adding an option to a method is one field here; this module imports neither torch nor the methods' layers, so
the CLI can build its options without loading PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ValidationError, create_model

from peft_export.errors import UsageError
from peft_export.options import Options, option, split_commas


class PeftOptions(Options):
    """Base of every method's options (a method without options uses it as it is)."""

    family = "PEFT"
    panel = "PEFT"


# ---- the options of each method ---------------------------------------------------------------------------

LoRATarget = Literal["q", "k", "v", "mlp"]


class LoRAOptions(PeftOptions):
    rank: int = option(32, "rank of A (r×D) and B (D×r)", ge=1)
    alpha: float = option(1.0, "scale α of B·A (no α/r division, as in the study)", allow_inf_nan=False)
    targets: Annotated[list[LoRATarget], BeforeValidator(split_commas)] = option(
        ["q", "v"], "comma-separated targets from q,k,v,mlp", min_length=1)


class FacTOptions(PeftOptions):
    rank: int = option(16, "rank of U (r×D), S_q, S_v (r×r) and V (D×r)", ge=1)
    dropout: float = option(0.1, "dropout on S·U x", ge=0.0, lt=1.0)
    scale: float = option(1.0, "scale s of the update s·V·S·U (FacT's hyper-parameter; 1 in the study)",
                          allow_inf_nan=False)


class SSFOptions(PeftOptions):
    patch_embed: bool = option(True, "scale and shift the patch embedding too", cli="--ssf-patch-embed")


class AdaptFormerOptions(PeftOptions):
    bottleneck: int = option(64, "bottleneck width", ge=1)
    alpha: Literal["learnable"] | float = option("learnable", "scale α of the adapter: 'learnable' or a number",
                                                 cli="--adapter-alpha")
    dropout: float = option(0.0, "dropout inside the adapter", ge=0.0, lt=1.0)
    variant: Literal["study", "plain"] = option(
        "study", "study (with the extra +u residual of the version the study used) or plain (without)")


# in the order `--help` lists the methods; the selective methods and the baselines have no options
OPTIONS: dict[str, type[PeftOptions]] = {
    "lora": LoRAOptions, "fact": FacTOptions, "ssf": SSFOptions, "adaptformer": AdaptFormerOptions,
    "attention": PeftOptions, "bias": PeftOptions, "layernorm": PeftOptions, "late_ft": PeftOptions,
    "frozen": PeftOptions, "full": PeftOptions,
}


# ---- validation -------------------------------------------------------------------------------------------

def options_class(method: str) -> type[PeftOptions]:
    cls = OPTIONS.get(method)
    if cls is None:
        raise UsageError(f"unknown PEFT method {method!r}; choose one of: {', '.join(OPTIONS)}")
    return cls


def parse_options(method: str, values: dict[str, Any]) -> PeftOptions:
    """``values`` (field names) checked and completed with the defaults; one clear line for a bad value."""
    cls = options_class(method)
    unknown = sorted(set(values) - set(cls.model_fields))
    if unknown:
        allowed = ", ".join(cls.model_fields) or "none"
        raise UsageError(f"{method} has no option {unknown[0]!r} (options: {allowed})")
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise UsageError(f"{method} option {cls.error_line(exc)}") from None


def _flag(cls: type[PeftOptions], name: str) -> str:
    return cls.flag_of(name).split("/")[0]


# ---- the command line and the training configuration ------------------------------------------------------

@dataclass
class CliOption:
    """One command-line option / configuration key, and the method fields it stands for."""

    key: str  # parameter name and configuration key: "rank", "adapter_alpha", "ssf_patch_embed"
    flag: str  # "--rank"; a bool option also has "--no-<name>"
    type: type  # int, float, bool or str (comma lists, choices and unions are given as text)
    fields: dict[str, str] = field(default_factory=dict)  # method -> its field name
    helps: list[str] = field(default_factory=list)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.fields)

    @property
    def help(self) -> str:
        return "; ".join(self.helps) + "."


def _cli_type(annotation: Any) -> type:
    return annotation if annotation in (int, float, bool) else str


def cli_options() -> list[CliOption]:
    """Every method's options as command-line options (shared by methods that name them alike)."""
    found: dict[str, CliOption] = {}
    for method, cls in OPTIONS.items():
        for name, info in cls.model_fields.items():
            flag = _flag(cls, name)
            key = flag.removeprefix("--").replace("-", "_")
            kind = _cli_type(info.annotation)
            opt = found.setdefault(key, CliOption(key, flag, kind))
            if opt.type is not kind:
                raise TypeError(f"option {flag} is a {opt.type.__name__} for {opt.methods[0]} but a "
                                f"{kind.__name__} for {method}")
            default = ",".join(info.default) if isinstance(info.default, list) else info.default
            opt.fields[method] = name
            opt.helps.append(f"{method}: {info.description} (default {default})")
    return list(found.values())


def config_keys() -> dict[str, type]:
    """Training-configuration key -> its value type (the CLI type)."""
    return {o.key: o.type for o in cli_options()}


METHOD_HELP = f"PEFT method: {', '.join(OPTIONS)}."
BLOCKS_HELP = ("Encoder blocks that get the method: all, late:N (last N), late:50%, 6-11, 0,3,9. "
               "Indices count ViT blocks, or TinyViT's attention blocks.")


def method_name(value: Any) -> Any:
    if value is not None:
        options_class(str(value))
    return value


def selection_fields(method: str | None, blocks: str | None, *, unset: str | None = None) -> dict[str, tuple]:
    """Field definitions (``pydantic.create_model`` form) of ``--peft``, ``--blocks`` and every method option, for
    a family that chooses a PEFT method: the training options, the PEFT settings ``merge`` takes for checkpoints
    that do not record them. ``method``/``blocks``: their defaults (None: ``unset`` is what --help shows)."""
    from pydantic import AfterValidator

    kind = Annotated[str, AfterValidator(method_name)]
    fields: dict[str, tuple] = {
        "peft": (kind if method else kind | None, option(method, METHOD_HELP, panel="PEFT", default_text=unset)),
        "blocks": (str if blocks else str | None, option(blocks, BLOCKS_HELP, panel="PEFT", default_text=unset)),
    }
    as_text = Annotated[str, BeforeValidator(_as_text)]  # lists, choices and unions: the command line's text
    for opt in cli_options():  # one field per option key; None: the method's own default (listed in the help)
        cli = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.type is bool else opt.flag
        kind = as_text if opt.type is str else opt.type
        fields[opt.key] = (kind | None, option(None, opt.help, cli=cli, panel="PEFT"))
    return fields


def _as_text(value: Any) -> Any:
    """A configuration file's list or number as the text the command line gives (the method's own options class
    checks it)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def select_options(method: str, values: dict[str, Any], warn: Callable[[str], None] | None = None) -> dict:
    """Configuration values (by key; None = not given) -> ``method``'s options by field name.

    A value given for an option the method does not have is ignored, with a ``warn`` line when ``warn`` is given.
    """
    options_class(method)
    chosen = {}
    for opt in cli_options():
        value = values.get(opt.key)
        if value is None:
            continue
        if method in opt.fields:
            chosen[opt.fields[method]] = value
        elif warn is not None:
            warn(f"{opt.flag} does not apply to {method}; ignored")
    return chosen


def peft_config_from(method: str, blocks: str | None, values: dict[str, Any],
                     warn: Callable[[str], None] | None = None) -> PeftConfig:
    """A validated :class:`PeftConfig` from configuration / command-line values (see :func:`select_options`)."""
    options = select_options(method, values, warn)
    parse_options(method, options)  # one clear line for a bad value, before any work
    return PeftConfig(method, blocks or "all", options)


@dataclass
class PeftConfig:
    """A PEFT method with its options and its placement. Stored in every checkpoint (``to_dict``)."""

    method: str
    placement: str = "all"
    options: dict[str, Any] = field(default_factory=dict)
    blocks: list[int] | None = None  # resolved indices (filled in by apply_peft)

    def to_dict(self) -> dict:
        return {"method": self.method, "placement": self.placement, "options": dict(self.options),
                "blocks": list(self.blocks) if self.blocks is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> PeftConfig:
        if not isinstance(d, dict) or "method" not in d:
            raise UsageError("PEFT configuration must be a dict with a 'method'")
        return cls(method=d["method"], placement=d.get("placement", "all"), options=dict(d.get("options") or {}),
                   blocks=list(d["blocks"]) if d.get("blocks") is not None else None)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}({opts}) on blocks {self.placement}" if opts else f"{self.method} on {self.placement}"


class _PeftSettings(Options):
    family = "PEFT"
    panel = "PEFT"

    def method_options(self) -> dict[str, Any]:
        """The method options given (by key)."""
        return {k: v for k in config_keys() if (v := getattr(self, k)) is not None}


# `merge` / `merge-and-export`: the PEFT settings of checkpoints that do not record them (micro-sam's)
PeftOverride = create_model("PeftOverride", __base__=_PeftSettings, __module__=__name__,
                            **selection_fields(None, None, unset="as recorded in the checkpoint"))
