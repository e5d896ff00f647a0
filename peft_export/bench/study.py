"""``peft-export benchmark study``: quality x cost across PEFT methods and placements, on the user's own data.

The study's central table, recomputed: every (method, placement) case is trained with the finetune recipe for the
same budget (steps, or minutes turned into steps per case), with the same seed, data order and prompts, then
validated (box / point mean IoU and mSA; instance-segmentation figures where finetune reports them), with the
cost figures of ``benchmark train`` measured in the same run (step time, peak and training memory, trainable
parameters). Each case runs in fresh processes: one measures its memory alone (allocator defaults, as
``benchmark train``), one trains and validates it (:mod:`peft_export.bench.study_case`).

The result folder is the study's state: ``study.json`` (the plan), ``cases/<case>/case.json`` once a case has
finished. An interrupted study (Ctrl-C, a lost machine) continues with ``--resume``: finished cases are kept, an
unfinished one resumes its training from its last checkpoint. The table, recommendation and plot are
:mod:`peft_export.bench.study_results`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from peft_export.bench.cases import Budget, StudyCase
from peft_export.bench.options import StudySettings
from peft_export.bench.study_case import run_case
from peft_export.bench.study_results import COSTS, METRICS, assemble, write_study_results
from peft_export.data.dataset import SAMPLE_PREFIX, load_samples
from peft_export.data.io import atomic_write
from peft_export.errors import PeftExportError, UsageError, first_line
from peft_export.peft.placement import resolve_placement
from peft_export.train.config import PRESETS, field_names

PLAN_VERSION = 1
# settings that change what a case measures: a resumed study must use the same ones
RESULT_KEYS = ("model", "data", "val", "checkpoint", "budget", "seed", "batch_size", "objects_per_image",
               "sub_iterations", "lr", "rank", "device", "precision", "trunk_cache", "instance_decoder",
               "memory_steps")


class StudyInterrupted(PeftExportError):
    exit_code = 130


def resolve_settings(s: StudySettings) -> StudySettings:
    """Validate the options and fill those left None from finetune's recipe preset; one line per problem."""
    # lazy: pulls segment_anything, torch, torchvision
    from peft_export.models.devices import resolve_device, resolve_precision
    from peft_export.models.registry import MODELS  # lazy: pulls segment_anything, torch, torchvision
    from peft_export.peft import METHODS  # lazy: pulls torch
    if s.model not in MODELS:
        raise UsageError(f"unknown model {s.model!r}; choose one of: {', '.join(MODELS)}")
    if not s.methods or not s.placements:
        raise UsageError("--methods and --placements must each name at least one entry")
    bad = [m for m in s.methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown PEFT method {bad[0]!r}; choose from: {', '.join(METHODS)}")
    s.budget = str(Budget.parse(s.budget))  # one spelling (a resumed study compares it)
    device = resolve_device(s.device)  # --device cuda without a GPU: one line now, not a skip per case
    resolve_precision(s.precision, device)
    if s.recipe not in ("auto", "study", "cpu"):
        raise UsageError(f"unknown recipe {s.recipe!r}; choose auto, study or cpu")
    preset = PRESETS["study" if s.recipe == "study" or (s.recipe == "auto" and device.type == "cuda") else "cpu"]
    for key in ("batch_size", "objects_per_image", "sub_iterations", "lr"):
        if getattr(s, key) is None:
            setattr(s, key, preset[key])
    for key in ("batch_size", "objects_per_image", "sub_iterations", "memory_steps"):
        if getattr(s, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1")
    if s.lr <= 0 or (s.rank is not None and s.rank < 1) or not 0 <= s.margin < 1:
        raise UsageError("--lr must be positive, --rank at least 1 and --margin in [0, 1)")
    if s.instance_decoder and "instance_decoder" not in field_names():
        raise UsageError("--instance-decoder needs finetune's instance decoder, which this version of peft-export "
                         "does not have (peft-export finetune --help lists --instance-decoder where it does)")
    if s.metric not in METRICS or s.cost not in COSTS:
        raise UsageError(f"--metric is one of {', '.join(METRICS)}; --cost one of {', '.join(COSTS)}")
    if s.metric.startswith("ais") and not s.instance_decoder:
        raise UsageError(f"--metric {s.metric} is an instance-segmentation figure: add --instance-decoder")
    _check_weights(s)
    _check_data(s)
    return s


def _check_weights(s: StudySettings) -> None:
    from peft_export.loading import default_weights  # lazy: pulls segment_anything, torch, torchvision
    from peft_export.models.registry import get_spec  # lazy: pulls segment_anything, torch, torchvision

    if s.checkpoint is not None:
        if not Path(s.checkpoint).is_file():
            raise UsageError(f"checkpoint not found: {s.checkpoint}")
    elif default_weights(s.model) is None and not get_spec(s.model).test_only:
        raise UsageError(f"no weights are bundled for {s.model}: the study measures quality, give its weights "
                         f"with --checkpoint (benchmark train measures cost with random weights)")


def _check_data(s: StudySettings) -> None:
    """Training and validation data readable, with objects; a validation split must exist."""
    load_samples(s.data, "train")
    if s.val is not None:
        val = load_samples(s.val, "val")
    elif str(s.data).startswith(SAMPLE_PREFIX) or (Path(s.data) / "val").is_dir():
        val = load_samples(s.data, "val")
    else:
        raise UsageError(f"{s.data} has no validation split and the study compares validation quality: give "
                         f"--val VAL_DIR (images/ + labels/), or put train/ and val/ sub-folders in {s.data}")
    if not val:
        raise UsageError(f"the validation data of {s.val or s.data} holds no labelled objects")


def plan_study(s: StudySettings) -> list[StudyCase]:
    """Every (method, placement) case; placements that do not fit the model are skipped with the reason."""
    for p in s.placements:
        resolve_placement(p, 10**4)  # the syntax now; the fit below
    from peft_export.peft import METHODS  # lazy: pulls torch (as _block_count does)

    n_blocks = _block_count(s.model)
    cases = []
    for m in s.methods:
        for p in s.placements:
            case = StudyCase(m, p)
            if m in METHODS and not METHODS[m].uses_placement and p != s.placements[0]:
                case.skipped = f"{m} does not use a placement: run once (with {s.placements[0]})"
            else:
                try:
                    case.blocks = resolve_placement(p, n_blocks, s.model)
                except UsageError as exc:
                    case.skipped = str(exc)
            cases.append(case)
    if len({c.slug for c in cases}) != len(cases):
        raise UsageError("two cases have the same name: list each method and placement once")
    return cases


def _block_count(model: str) -> int:
    """Encoder blocks of ``model``, from a weightless build (meta device: no memory, any model size)."""
    import torch

    from peft_export.models.registry import encoder_blocks, get_spec  # lazy: pulls segment_anything, torch, torchvision

    with torch.device("meta"):
        return len(encoder_blocks(get_spec(model).builder()))


class StudyFolder:
    """RESULT_DIR: the plan, one folder per case, and the finished cases' rows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.plan_file = self.path / "study.json"

    def case_dir(self, case: StudyCase) -> Path:
        return self.path / "cases" / case.slug

    def finished(self, case: StudyCase) -> dict | None:
        f = self.case_dir(case) / "case.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def save_case(self, case: StudyCase, row: dict) -> None:
        d = self.case_dir(case)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "case.json", lambda tmp: tmp.write_text(json.dumps(row, indent=2) + "\n"))

    def check(self, s: StudySettings, cases: list[StudyCase], *, resume: bool, force: bool) -> int:
        """Whether the study may start (or continue) here, changing nothing; how many cases had finished."""
        if self.path.is_file():
            raise UsageError(f"result folder {self.path} is a file")
        exists = self.path.is_dir() and any(self.path.iterdir())
        if not exists or (force and not resume):
            return 0
        if not resume:
            hint = (f"holds a study with {self.done_count(cases)} of {len(cases)} case(s) finished; continue it "
                    "with --resume or start over with --force") if self.plan_file.is_file() else "already exists"
            raise UsageError(f"result folder {self.path} {hint}; nothing was changed")
        if not self.plan_file.is_file():
            raise UsageError(f"{self.path} holds no study to resume (no study.json); use another --output")
        self._check_resume(s)
        return self.done_count(cases)

    def open(self, s: StudySettings, cases: list[StudyCase], *, resume: bool, force: bool) -> int:
        """Start (or continue, with ``resume``) the study here; returns how many cases had finished before."""
        done = self.check(s, cases, resume=resume, force=force)
        if force and not resume and self.path.is_dir():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        plan = {"kind": "study-plan", "version": PLAN_VERSION, "settings": s.to_dict(),
                "cases": [{"case": c.name, "slug": c.slug, "skipped": c.skipped} for c in cases]}
        atomic_write(self.plan_file, lambda tmp: tmp.write_text(json.dumps(plan, indent=2) + "\n"))
        return done

    def done_count(self, cases: list[StudyCase]) -> int:
        return sum(self.finished(c) is not None for c in cases)

    def _check_resume(self, s: StudySettings) -> None:
        try:
            saved = json.loads(self.plan_file.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read {self.plan_file}: {first_line(exc)}") from None
        new = s.to_dict()
        diff = [f"{k} (study: {saved.get(k)!r}, given: {new[k]!r})" for k in RESULT_KEYS if saved.get(k) != new[k]]
        if diff:
            raise UsageError("--resume continues the study with its own settings; these differ: " + "; ".join(diff)
                             + " (start a new study with another --output, or --force)")


Progress = Callable[[int, float, str], None]  # (case index, fraction of that case done, text)


def _case_row(folder: StudyFolder, case: StudyCase, s: StudySettings, say: Callable[[float, str], None]) -> dict:
    """A finished case's saved row, a skipped case's reason, or the case measured now (and saved unless failed)."""
    row = folder.finished(case)
    if row is not None:
        return row
    if case.skipped:
        return {"case": case.name, "method": case.method, "placement": case.placement, "skipped": case.skipped}
    row = run_case(case, s, folder.case_dir(case), say)
    if "failed" not in row:
        folder.save_case(case, row)
    return row


def run_study(s: StudySettings, cases: list[StudyCase], out_dir: str | Path, *, resume: bool = False,
              force: bool = False, progress: Progress | None = None) -> dict:
    """Run (or continue) the study; writes RESULT_DIR's files and returns results.json's content.

    ``s`` and ``cases`` come from :func:`resolve_settings` and :func:`plan_study` (the CLI validates before it
    touches the folder). Ctrl-C: the case in progress saves a checkpoint, StudyInterrupted says how to go on.
    """
    say = progress or (lambda i, f, text: None)
    folder = StudyFolder(Path(out_dir))
    before = folder.open(s, cases, resume=resume, force=force)
    rows: list[dict] = []
    try:
        for i, case in enumerate(cases):
            rows.append(_case_row(folder, case, s, lambda f, text, i=i: say(i, f, text)))
            say(i, 1.0, case.name)
    except KeyboardInterrupt:
        now = cases[len(rows)].name if len(rows) < len(cases) else "the last case"
        raise StudyInterrupted(f"interrupted during {now}: {folder.done_count(cases)} of {len(cases)} case(s) "
                               f"finished and kept in {folder.path}; run the same command with --resume to "
                               "continue") from None
    results = assemble(rows, s, resumed_cases=before)
    write_study_results(folder.path, results)
    return results
