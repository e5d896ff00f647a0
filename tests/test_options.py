"""The option families (issue 21): every option declared once, in a pydantic model; the command line generated from
them (each flag once, with the model's help and default); configuration keys that round-trip."""

from __future__ import annotations

import re

import pytest
import typer
from pydantic import Field

from peft_export.errors import UsageError
from peft_export.options import Options, option


def _commands():
    """(command path, click command, its option families) for every command of the app."""
    from peft_export_cli.app import app

    root = typer.main.get_command(app)

    def walk(cmd, path):  # typer vendors click (typer._click): duck-typed, not isinstance(click.Group)
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield " ".join(path), cmd, getattr(cmd.callback, "option_families", {})

    return list(walk(root, ()))


COMMANDS = _commands()


def test_every_command_takes_its_options_from_families():
    """Only positionals and I/O flags are declared by commands; the rest comes from the families."""
    io_flags = {"--output", "--force", "--json", "--quiet", "--help", "--version", "--verbose", "--out", "--config",
                "--resume", "--checkpoint", "--boxes", "--points", "--auto", "--embeddings", "--skip-existing",
                "--shard", "--overlay", "--print-trtexec", "--data", "--labels", "--split"}
    with_families = {name for name, _, fams in COMMANDS if fams}
    assert {"finetune", "export", "merge-and-export", "merge", "predict", "evaluate", "embed", "build-engine",
            "package", "benchmark train", "benchmark infer", "benchmark study"} <= with_families
    for name, cmd, fams in COMMANDS:
        declared = {f.primary_flag for fam in fams.values() for f in fam.cli_fields()}
        for p in cmd.params:
            if p.param_type_name == "option" and p.opts[0] not in declared:
                assert p.opts[0] in io_flags, f"{name}: {p.opts[0]} is declared by the command, not by a family"


@pytest.mark.parametrize("name,cmd,fams", [c for c in COMMANDS if c[2]], ids=[c[0] for c in COMMANDS if c[2]])
def test_every_family_option_appears_once_in_help_with_its_default_and_help(name, cmd, fams):
    params = {p.opts[0]: p for p in cmd.params if p.param_type_name == "option"}
    for fam in fams.values():
        for f in fam.cli_fields():
            flag = f.primary_flag
            assert flag in params, f"{name}: {flag} of {fam.family} is missing"
            p = params[flag]
            assert f.help.split("(")[0][:40] in p.help.replace("\\[", "["), f"{name} {flag}: help not the model's"
            shown = f.shown_default()
            if shown is not None:
                assert f"[default: {shown}]" in p.help.replace("\\[", "["), f"{name} {flag}: default not shown"
            if f.short:
                assert f.short in p.opts
    from typer.testing import CliRunner

    from peft_export_cli.app import app

    rendered = CliRunner().invoke(app, [*name.split(), "--help"], env={"COLUMNS": "1000"}).output
    flat = re.sub(r"\s+", " ", rendered.replace("│", " "))  # as shown, wrapped lines joined
    for fam in fams.values():
        for f in fam.cli_fields():
            n = len(re.findall(rf"(?<![\w-]){re.escape(f.primary_flag)}(?![\w-])", rendered))
            assert n >= 1, f"{name}: {f.primary_flag} not in --help"
            shown = f.shown_default()
            if shown is not None:  # what the user sees: rich markup once ate "[default: ...]" (issue 20)
                want = "[default: " + " ".join(shown.split()) + "]"
                assert want in flat, f"{name} {f.primary_flag}: default not shown in --help"


def test_flags_of_one_command_are_unique():
    for name, cmd, _ in COMMANDS:
        flags = [o for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)]
        dup = {f for f in flags if flags.count(f) > 1}
        assert not dup, f"{name}: {dup} declared twice"


class Inner(Options):
    family, panel = "inner", "Inner"
    depth: int = option(3, "Depth.", ge=1)


class Outer(Options):
    family, panel = "outer", "Outer"
    name: str = option("x", "A name.", short="-n")
    tags: list[str] = option([], "A tag; repeat.", cli="--tag", repeat=True)
    ok: bool = option(True, "On or off.")
    inner: Inner = Field(default_factory=Inner)


def test_the_generated_command_passes_validated_families():
    """A family with a nested family and a repeated list, through the generator: values arrive typed; a bad value
    is one line naming the flag; a value not given keeps the model's default and is not in model_fields_set."""
    from peft_export_cli.options import with_options

    got = {}
    app = typer.Typer()

    @app.command()
    @with_options(opts=Outer)
    def cmd(pos: str = typer.Argument(...), *, opts: Outer):
        got.update(pos=pos, opts=opts)

    from typer.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(app, ["p", "-n", "y", "--tag", "a", "--tag", "b", "--no-ok", "--depth", "5"])
    assert res.exit_code == 0, res.output
    o = got["opts"]
    assert (o.name, o.tags, o.ok, o.inner.depth) == ("y", ["a", "b"], False, 5)
    runner.invoke(app, ["p"])
    assert got["opts"] == Outer() and got["opts"].given() == {}
    with pytest.raises(UsageError, match=r"^--depth: Input should be greater than or equal to 1 \(got 0\)$"):
        Outer.parse({"inner.depth": 0})


FAMILIES = []


def _families():
    """Every public option family of the library (each subclass of Options, once the CLI, which imports them all,
    is loaded): a family added to the library joins the round-trip matrix below by itself."""
    import peft_export_cli.app  # noqa: F401

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    return sorted({c for c in subclasses(Options) if c.__module__.startswith("peft_export.")
                   and not c.__name__.startswith("_")}, key=lambda c: (c.__module__, c.__name__))


def test_the_family_matrix_holds_the_known_families():
    names = {f.__name__ for f in _families()}
    assert {"TrainConfig", "ExportOptions", "MergeOptions", "EngineOptions", "PackageOptions", "PeftOverride",
            "RuntimeOptions", "AutoOptions", "APGOptions", "Tiling", "TrainSettings", "StudySettings",
            "InferSettings", "CpuGateOptions", "EvaluateOptions", "LoRAOptions"} <= names, names


@pytest.mark.parametrize("family", _families(), ids=lambda f: f.__name__)
def test_every_family_round_trips_through_its_keys(family):
    """to_dict() -> parse() gives the same options back, for the defaults and for every field changed."""
    default = family()
    assert family.parse(default.to_dict()) == default
    for f in family.cli_fields():
        if f.kind is bool:
            changed = family.parse({f.name: not f.default})
        elif f.choices and len(f.choices) > 1:
            changed = family.parse({f.name: next(c for c in f.choices if c != str(f.default))})
        else:
            continue
        assert family.parse(changed.to_dict()) == changed, f.name


def test_training_yaml_round_trips(tmp_path):
    """RUN_DIR/config.yaml (every key, PEFT options included) read back gives the same configuration."""
    from peft_export.train.config import read_config_file, resolve_config, to_yaml

    cfg = resolve_config(cli_values={"peft": "fact", "rank": 8, "scale": 2.0, "blocks": "late:2", "iterations": 3,
                                     "augment": "flip,rot90", "val_prompts": "box", "val_metric": "box"})
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = resolve_config(read_config_file(tmp_path / "config.yaml"))
    assert again == cfg and again.augment == ["flip", "rot90"] and again.rank == 8


def test_benchmark_options_are_the_training_options():
    """Composed, not copied: the same help and constraints; methods are the registered ones (frozen, not
    freeze_encoder)."""
    from peft_export.bench.options import StudySettings, TrainSettings
    from peft_export.train.config import TrainConfig

    for fam in (TrainSettings, StudySettings):
        for key in ("lr", "objects_per_image", "rank", "model", "data"):
            if key in fam.model_fields:
                assert fam.model_fields[key].description == TrainConfig.model_fields[key].description
    assert TrainSettings.parse({"methods": "lora,frozen"}).methods == ["lora", "frozen"]
    with pytest.raises(UsageError, match="unknown PEFT method 'freeze_encoder'"):
        TrainSettings.parse({"methods": "freeze_encoder"})


def test_methods_without_a_placement_are_planned_once():
    """frozen and full train no block selection: benchmark train and study measure them once, not once per
    placement (the skip named freeze_encoder, a name the registry never had, so it never applied)."""
    from peft_export.bench.options import StudySettings, TrainSettings
    from peft_export.bench.study import plan_study
    from peft_export.bench.train import plan_cases

    values = {"methods": "frozen,full,lora", "placements": "all,late:1", "model": "vit_tiny"}
    s = TrainSettings.parse(values)
    for cases in (plan_cases(s.methods, s.placements, s), plan_study(StudySettings.parse(values))):
        assert {(c.method, c.placement) for c in cases if c.skipped} == {("frozen", "late:1"), ("full", "late:1")}


def test_the_command_line_starts_without_the_heavy_stack():
    """`peft-export --help` loads no PyTorch, ONNX, ONNX Runtime, OpenVINO, SciPy or napari (cli/app.py's rule)."""
    import subprocess
    import sys

    code = "import sys, peft_export_cli.app; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    heavy = {"torch", "onnx", "onnxruntime", "openvino", "scipy", "napari", "segment_anything", "onnxscript", "nncf",
             "tensorrt", "matplotlib", "bioimageio"}
    assert not loaded & heavy, loaded & heavy
