"""The documentation site (issue 25): it builds strictly, its generated reference lists every command and flag, and
every flag and command line written in README.md and docs/ exists in the CLI.

The reference pages are generated from the Typer app (tools/docs_cli.py); these tests walk the app themselves
(typer vendors click as typer._click: duck typing) and check the built HTML and the hand-written Markdown against
it. No model runs here.
"""

from __future__ import annotations

import html
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
HAND_WRITTEN = sorted(DOCS.rglob("*.md"))
RECIPES = [ROOT / "README.md"] + [p for p in HAND_WRITTEN if p.parent.name == "how-to" or p.name == "get-started.md"]
PROG = "peft-export"


def _walk():
    from peft_export_cli.app import app

    root = typer.main.get_command(app)
    leaves = {}

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        else:
            leaves[" ".join(path)] = cmd

    walk(root, ())
    return root, leaves


ROOT_CMD, COMMANDS = _walk()
GROUPS = {name for name, sub in ROOT_CMD.commands.items() if hasattr(sub, "commands")}


def _flags(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


GLOBAL_FLAGS = _flags(ROOT_CMD) | {"--help", "-h"}
FLAGS = {name: _flags(cmd) | GLOBAL_FLAGS for name, cmd in COMMANDS.items()}
ALL_FLAGS = set().union(*FLAGS.values())

# Flags written in the docs that belong to other programs, each with where it is checked or why it is allowed.
SCRIPTS = {"benchmarks/gpu_check.sh": "benchmarks/gpu_check.py"}
OTHER_PROGRAMS = {"pip", "pip3", "python3 -m venv", "bioimageio", "sbatch", "mkdocs", "trtexec", "git", "bash"}
NOT_CLI = {
    "--int8": "TensorRT's builder flag (trtexec --int8), named where the docs say it is not used",
    "--with-pytorch": "a package option the README lists as not included",
    "--array": "SLURM's #SBATCH --array, quoted in the --shard message",
    "--no-deps": "pip's flag, in prose about installing",
    "--models": "benchmarks/train_cost.py",
    "--exports": "benchmarks/int8_cpu.py",
    "--budget-s": "benchmarks/gpu_check.py",
    "--cpu-dry-run": "benchmarks/gpu_check.py",
    "--parts": "benchmarks/gpu_check.py",
}


# ---- Markdown reading ------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^([ \t]*)```([\w-]*)[^\n]*\n(.*?)^\1```", re.S | re.M)
_SPAN = re.compile(r"`((?:[^`\n]|\n(?!\s*\n))+)`")  # inline code, also across a line break
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, the indentation of tabbed blocks removed."""
    out = []
    for m in _FENCE.finditer(text):
        indent = len(m.group(1))
        body = "\n".join(line[indent:] for line in m.group(3).splitlines())
        out.append((m.group(2), body))
    return out


def _prose(text: str) -> str:
    return _FENCE.sub("", text)


def _shell_lines(body: str) -> list[str]:
    """Command lines of a shell block: continuations joined, heredoc bodies and comment lines left out."""
    lines, heredoc, current = [], None, ""
    for raw in body.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = raw.rstrip()
        m = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if m:
            heredoc = m.group(1)
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            lines.append(current.strip())
        current = ""
    return lines


def _segments(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ; and |), each as shell words."""
    out = []
    for part in re.split(r"\s(?:&&|\|\||;|\|)\s", line):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            words = part.split()
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # OMP_NUM_THREADS=1 peft-export ...
            words = words[1:]
        if words:
            out.append(words)
    return out


def _split_command(words: list[str]) -> tuple[str | None, list[str]]:
    """A peft-export command line -> (command path, its arguments); torchrun ... -m peft_export_cli.app too."""
    if words[0] == PROG:
        rest = words[1:]
    elif "peft_export_cli.app" in words:
        rest = words[words.index("peft_export_cli.app") + 1:]
    else:
        return None, []
    while rest and rest[0] in GLOBAL_FLAGS:
        rest = rest[1:]
    if not rest:
        return "", []
    if rest[0] in GROUPS and len(rest) > 1 and f"{rest[0]} {rest[1]}" in COMMANDS:
        return f"{rest[0]} {rest[1]}", rest[2:]
    return rest[0], rest[1:]


def _flags_in(words: list[str]) -> list[str]:
    found = []
    for w in words:
        m = re.match(r"--[a-z][a-z0-9-]*", w.strip("[]("))
        if m:
            found.append(m.group(0))
    return found


def _script_flags_ok(words: list[str]) -> list[str]:
    """Flags of `python benchmarks/x.py ...` / `bash benchmarks/x.sh ...` missing from that script's source."""
    script = next((w for w in words if w.startswith("benchmarks/")), None)
    if script is None:
        return []
    source = ROOT / SCRIPTS.get(script, script)
    text = source.read_text() if source.is_file() else ""
    return [f for f in _flags_in(words) if f'"{f}"' not in text and f"'{f}'" not in text]


def _check_words(words: list[str], where: str, problems: list[str]) -> None:
    cmd, args = _split_command(words)
    if cmd is not None:
        if cmd not in COMMANDS:
            if cmd and not (cmd in GROUPS and not args) and not cmd.isupper():  # `peft-export COMMAND --help`
                problems.append(f"{where}: `{PROG} {cmd}` is not a command")
            return
        problems += [f"{where}: {f} is not a flag of `{PROG} {cmd}`" for f in _flags_in(args) if f not in FLAGS[cmd]]
        return
    if words[0] in ("python", "python3", "bash") and any(w.startswith("benchmarks/") for w in words):
        problems += [f"{where}: {f} is not a flag of {words}" for f in _script_flags_ok(words)]
        return
    if words[0] in {p.split()[0] for p in OTHER_PROGRAMS} or words[0] in ("python", "python3", "torchrun"):
        return
    # not a command line (a flag list, a message): each flag must exist on some command
    problems += [f"{where}: {f} exists on no command" for f in _flags_in(words)
                 if f not in ALL_FLAGS and f not in NOT_CLI]


def _flag_problems(text: str, where: str) -> list[str]:
    problems: list[str] = []
    for lang, body in _blocks(text):
        if lang not in ("bash", "sh", "shell", "console", ""):
            continue
        for line in _shell_lines(body):
            for words in _segments(line):
                _check_words(words, where, problems)
    prose = _prose(text)
    for span in _SPAN.findall(prose):
        for words in _segments(span):
            _check_words(words, where, problems)
    bare = _SPAN.sub("", prose)
    problems += [f"{where}: {f} (prose) exists on no command" for f in _FLAG.findall(bare)
                 if f not in ALL_FLAGS and f not in NOT_CLI]
    return problems


# ---- flags and command lines (fast) ----------------------------------------------------------------------------

def test_the_markdown_reader_finds_commands_and_wrong_flags():
    """The checker itself: it sees commands in fences, tabs, continuations and inline code, and flags a wrong one."""
    text = ("intro `peft-export predict x y -o z --nope`\n\n=== \"tab\"\n\n    ```bash\n    peft-export finetune \\\n"
            "      --epochs 2 --bogus 1 && peft-export benchmark study --objects 4\n    ```\n\nprose --not-a-flag\n")
    found = "\n".join(_flag_problems(text, "example.md"))
    assert "--nope is not a flag of `peft-export predict`" in found
    assert "--bogus is not a flag of `peft-export finetune`" in found
    assert "--epochs" not in found
    assert "--objects is not a flag of `peft-export benchmark study`" in found
    assert "--not-a-flag (prose) exists on no command" in found


@pytest.mark.parametrize("path", [ROOT / "README.md", *HAND_WRITTEN], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_written_in_the_docs_exists(path):
    """A flag in a command line exists on that command; a flag in prose exists on some command (or is named in
    NOT_CLI with the program it belongs to); a benchmark script's flags exist in that script."""
    problems = _flag_problems(path.read_text(), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_flags_allowed_outside_the_cli_are_not_cli_flags_and_scripts_have_theirs():
    assert not set(NOT_CLI) & ALL_FLAGS, "a NOT_CLI flag is a CLI flag now: remove it from NOT_CLI"
    for flag, why in NOT_CLI.items():
        if why.startswith("benchmarks/"):
            assert f'"{flag}"' in (ROOT / why).read_text(), f"{flag} is not a flag of {why}"


def _recipe_lines():
    for path in RECIPES:
        for lang, body in _blocks(path.read_text()):
            if lang != "bash":
                continue
            for line in _shell_lines(body):
                for words in _segments(line):
                    if words[0] == PROG:
                        yield f"{path.relative_to(ROOT)}: {' '.join(words)}", words


RECIPE_LINES = list(_recipe_lines())


def test_the_recipes_have_command_lines():
    assert len(RECIPE_LINES) >= 40
    assert {_split_command(w)[0] for _, w in RECIPE_LINES} >= {
        "finetune", "merge", "export", "merge-and-export", "build-engine", "predict", "evaluate", "embed", "package",
        "benchmark study", "benchmark train"}


@pytest.mark.parametrize("where,words", RECIPE_LINES, ids=[w for w, _ in RECIPE_LINES])
def test_every_recipe_command_line_parses(where, words):
    """Each `peft-export ...` line of the how-to pages parses as that command would (arguments, flags, types), and
    its option families accept the values (the command's own validation, without running it)."""
    cmd_name, args = _split_command(words)
    assert cmd_name in COMMANDS, f"{where}: no command {cmd_name!r}"
    cmd = COMMANDS[cmd_name]
    ctx = cmd.make_context(f"{PROG} {cmd_name}", list(args))
    for name, family in (getattr(cmd.callback, "option_families", None) or {}).items():
        prefix = f"{name}__"
        family.parse({k[len(prefix):].replace("__", "."): v for k, v in ctx.params.items() if k.startswith(prefix)})


def test_recipes_write_distinct_outputs():
    """The recipes run one after another as written: no two write the same output (no command overwrites one
    without --force), except a line that says --force or --resume."""
    seen: dict[str, str] = {}
    for where, words in RECIPE_LINES:
        if "--force" in words or "--resume" in words:
            continue
        for i, w in enumerate(words[:-1]):
            if w in ("-o", "--out", "--output", "--overlay"):
                out = words[i + 1].rstrip("/")
                assert out not in seen, f"{where} writes {out}, as {seen[out]} does"
                seen[out] = where


def test_a_wrong_recipe_line_does_not_parse():
    cmd = COMMANDS["predict"]
    with pytest.raises(Exception, match="--nope"):
        cmd.make_context(f"{PROG} predict", ["x", "y", "-o", "z.tif", "--nope"])
    from peft_export.errors import UsageError

    ctx = cmd.make_context(f"{PROG} predict", ["x", "y", "-o", "z.tif", "--method", "foo"])
    with pytest.raises(UsageError, match="--method"):
        cmd.callback.option_families["auto"].parse({"method": ctx.params["auto__method"]})


def test_the_readme_is_short_and_its_links_resolve():
    """The README leads to the site: at most 150 lines, and every relative link names a file of the repository
    (generated pages are not files: the README must not link them)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = [t for t in re.findall(r"\]\(([^)]+)\)", text) if not re.match(r"[a-z]+:", t)]
    assert links and [t for t in links if not (ROOT / t.split("#")[0]).is_file()] == []


def _python_blocks():
    for path in [ROOT / "README.md", *HAND_WRITTEN]:
        for lang, body in _blocks(path.read_text()):
            if lang == "python":
                yield f"{path.relative_to(ROOT)}: {body.splitlines()[0][:50]}", body


PYTHON_BLOCKS = list(_python_blocks())


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_python_snippets_name_what_exists(where, code):
    """The docs' Python snippets compile, their peft_export imports resolve, and the Segmenter methods they call
    exist (nothing runs)."""
    import ast
    import importlib

    tree = ast.parse(code)
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peft_export"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    segmenters = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                  and isinstance(node.value.func, ast.Name) and node.value.func.id == "Segmenter"
                  for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in segmenters:
                assert hasattr(names["Segmenter"], node.attr), f"{where}: Segmenter has no {node.attr}"
            elif node.value.id in names and isinstance(names[node.value.id], type):
                assert hasattr(names[node.value.id], node.attr), f"{where}: {node.value.id} has no {node.attr}"


# ---- the built site --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return out


def _text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", path.read_text()))


def _sections(page: Path) -> dict[str, str]:
    """h2 id -> the text of that section (up to the next h2)."""
    raw = page.read_text()
    parts = re.split(r'<h2 id="([^"]+)"', raw)
    return {parts[i]: html.unescape(re.sub(r"<[^>]+>", " ", parts[i + 1])) for i in range(1, len(parts), 2)}


@pytest.mark.docs
def test_the_site_builds_strictly_with_every_page(site):
    """`mkdocs build --strict` (the fixture) passed: no broken link, anchor or reference; every page is there."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for key in ("unrecognized_links", "anchors", "omitted_files", "not_found"):  # --strict turns these into errors
        assert config["validation"][key] == "warn"
    pages = [p.relative_to(DOCS).with_suffix("") for p in HAND_WRITTEN]
    for page in pages:
        index = site / ("index.html" if page.name == "index" else f"{page}/index.html")
        assert index.is_file(), f"{page} was not built"
    for generated in ("reference/cli", "reference/options", "reference/errors", "benchmarks"):
        assert (site / generated / "index.html").is_file()


@pytest.mark.docs
def test_every_command_and_flag_is_in_the_cli_reference(site):
    sections = _sections(site / "reference/cli/index.html")
    for name, cmd in COMMANDS.items():
        anchor = name.replace(" ", "-")
        assert anchor in sections, f"`{PROG} {name}` has no section in the CLI reference"
        text = sections[anchor]
        assert f"{PROG} {name}" in text
        for p in cmd.params:
            for flag in (*p.opts, *p.secondary_opts):
                if flag.startswith("-"):
                    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{name}: {flag} missing"
            if getattr(p, "param_type_name", "") == "argument":
                assert (getattr(p, "metavar", None) or p.name).upper() in text
        for family in (getattr(cmd.callback, "option_families", None) or {}).values():
            for f in family.cli_fields():
                assert f.name in text, f"{name}: config key {f.name} of {family.__name__} missing"
                shown = f.shown_default()
                if shown:
                    assert " ".join(shown.split()) in " ".join(text.split()), f"{name} {f.flag}: default {shown!r}"


@pytest.mark.docs
def test_every_option_family_field_is_in_the_options_reference(site):
    sections = _sections(site / "reference/options/index.html")
    families = {m for cmd in COMMANDS.values() for m in (getattr(cmd.callback, "option_families", None) or {}).values()}
    assert len(families) >= 10
    for model in families:
        anchor = model.__name__.lower()
        assert anchor in sections, f"{model.__name__} has no section"
        text = sections[anchor]
        for f in model.cli_fields():
            assert f.name in text and f.primary_flag in text, f"{model.__name__}.{f.name}"
            assert " ".join(f.help.split())[:40] in " ".join(text.split()), f"{model.__name__}.{f.name}: help"


@pytest.mark.docs
def test_every_bench_json_has_a_page_with_its_figures(site):
    import json

    jsons = sorted(DOCS.glob("bench_*.json"))
    assert jsons
    index = (site / "benchmarks/index.html").read_text()
    for path in jsons:
        page = site / "benchmarks" / path.stem / "index.html"
        assert page.is_file(), f"{path.name} has no page"
        assert f'href="{path.stem}/"' in index, f"{path.name}: not linked from the benchmarks index"
        text = _text(page)
        data = json.loads(path.read_text())
        cpu = data.get("cpu") or data.get("machine", {}).get("cpu")
        cpu = cpu.get("model") if isinstance(cpu, dict) else cpu
        assert cpu in text, f"{path.name}: the CPU is not stated"
        assert (site / "benchmarks" / f"{path.stem}.png").is_file(), f"{path.name}: no plot"
        if data.get("kind") == "train":  # a figure taken from the JSON, as the page prints it
            assert f"{data['cases'][0]['step_median_s']:.2f}" in text


@pytest.mark.docs
def test_the_error_index_lists_the_code_s_messages(site):
    text = " ".join(_text(site / "reference/errors/index.html").split())
    for line in ("give exactly one of --boxes FILE, --points FILE or --auto",
                 "expected sub-folders images/ and labels/ (pairs with the same file name)"):
        assert line in text


def test_the_file_formats_page_names_what_the_code_writes():
    from dataclasses import fields

    from peft_export.manifest import Manifest
    from peft_export.train.run_folder import RUN_FILES

    page = (DOCS / "reference/file-formats.md").read_text()
    for f in fields(Manifest):
        assert f"`{f.name}`" in page, f"manifest field {f.name} is not documented"
    for name in RUN_FILES:
        assert f"`{name}`" in page, f"run-folder file {name} is not documented"
    build = (ROOT / "peft_export/export/tensorrt/build.py").read_text()
    body = build[build.index("def _metadata"):]
    body = body[body.index("return {"):body.index("\n    }\n")]
    for key in re.findall(r'^\s+"(\w+)":', body, re.M):
        assert f"`{key}`" in page, f"engine.json key {key} is not documented"


# ---- the generators on their own (fast) ------------------------------------------------------------------------

@pytest.fixture
def tools_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))


def test_a_new_bench_json_of_unknown_kind_gets_a_page_with_its_values(tools_on_path, tmp_path):
    pytest.importorskip("matplotlib")
    import json

    import docs_bench

    path = tmp_path / "bench_new_thing.json"
    path.write_text(json.dumps({"machine": {"cpu": "Some CPU", "cpu_count": 8, "gpus": ["Some GPU"]},
                                "figures": {"speedup": 1.23, "rows": [{"case": "a", "ms": 4.5}]}}))
    page = docs_bench.render(tmp_path, path)
    assert page.uri == "benchmarks/bench_new_thing.md"
    for shown in ("Some CPU", "Some GPU", "| cores | 8 |", "`figures.speedup` | 1.23", "`figures.rows[0].ms` | 4.5",
                  "not committed yet"):
        assert shown in page.markdown, shown


def test_the_benchmark_pages_commands_exist(tools_on_path):
    """The command lines the benchmark pages show for JSONs that do not record theirs: real flags, parsing."""
    import docs_bench

    problems: list[str] = []
    for stem, line in docs_bench.COMMANDS.items():
        assert (DOCS / f"{stem}.json").is_file(), f"COMMANDS names {stem}, which has no JSON"
        for words in _segments(line):
            _check_words(words, f"docs_bench.COMMANDS[{stem}]", problems)
            cmd, args = _split_command(words)
            if cmd:
                COMMANDS[cmd].make_context(f"{PROG} {cmd}", list(args))
    assert not problems, "\n".join(problems)


def test_the_error_index_renders_f_string_messages(tools_on_path, tmp_path):
    import docs_errors

    (tmp_path / "peft_export").mkdir()
    (tmp_path / "cli").mkdir()
    (tmp_path / "peft_export" / "thing.py").write_text(
        "from peft_export.errors import DataError, UsageError\n"
        "def f(p, n):\n"
        "    raise DataError(f\"{p.name}: {n} planes\" + \" (one expected)\")\n"
        "def g():\n"
        "    raise UsageError('plain text')\n"
        "def h():\n"
        "    raise ValueError('not a user error')\n")
    msgs = docs_errors.collect(tmp_path)
    assert [(m.kind, m.text) for m in msgs] == [("DataError", "{p.name}: {n} planes (one expected)"),
                                                ("UsageError", "plain text")]
