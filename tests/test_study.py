"""`peft-export benchmark study`: schema, resume after a real Ctrl-C, the recommendation rule, the plot, bad input.

One small study (tinyvit_tiny, 64x64 synthetic disks, LoRA on all / late:1 blocks, plus late:9, which does not
fit) is interrupted with SIGINT after its first case and resumed; the other tests read that folder. Figures are
checked against independent references (trainable parameters from LoRA applied directly to a fresh model, the
validation figures from `evaluate` on the kept checkpoint, the ratios and the recommendation recomputed from the
rows); timings themselves are never asserted.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time

import numpy as np
import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 3


def _disks(rng, size: int = 64, n: int = 4):
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint16)
    for k, (cy, cx) in enumerate(rng.uniform(10, size - 10, (n, 2)), 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(5, 8) ** 2] = k
    image = ((labels > 0) * 150 + rng.normal(30, 8, labels.shape)).clip(0, 255).astype(np.uint8)
    return image, labels


def write_folder(root, splits=(("train", 2), ("val", 1)), seed: int = 0):
    import tifffile

    rng = np.random.default_rng(seed)
    for split, n in splits:
        base = root / split if split else root
        for sub in ("images", "labels"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, labels = _disks(rng)
            tifffile.imwrite(base / "images" / f"img{i}.tif", image)
            tifffile.imwrite(base / "labels" / f"img{i}.tif", labels)
    return root


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("disks"))


def _argv(data, out, *extra: str) -> list[str]:
    return ["benchmark", "study", "--model", "tinyvit_tiny", "--data", str(data), "--methods", "lora", "--rank", "4",
            "--placements", "all,late:1,late:9", "--budget", str(STEPS), "--objects-per-image", "2",
            "--memory-steps", "1", "--keep-checkpoints", "-o", str(out), *extra]


@pytest.fixture(scope="module")
def study(disks, tmp_path_factory):
    """The study, stopped like Ctrl-C between the second case's memory run and its training, then continued with
    --resume (Ctrl-C reaching a worker: test_worker_gets_ctrl_c_and_ends; finetune's own resume: test_train)."""
    from peft_export.bench.study import StudyInterrupted, StudySettings, plan_study, resolve_settings, run_study
    from peft_export_cli.app import main

    out = tmp_path_factory.mktemp("study") / "result"

    def ctrl_c(i, fraction, text):
        if i == 1 and "training" in text:
            raise KeyboardInterrupt

    s = resolve_settings(StudySettings(model="tinyvit_tiny", data=str(disks), methods=["lora"], rank=4,
                                       placements=["all", "late:1", "late:9"], budget=str(STEPS),
                                       objects_per_image=2, memory_steps=1, keep_checkpoints=True))
    with pytest.MonkeyPatch.context() as mp:
        # one intra-op thread in the case workers: on a loaded 2-core CI machine, tiny-model steps are 5-8x
        # faster than with torch's two spinning threads
        mp.setenv("OMP_NUM_THREADS", "1")
        with pytest.raises(StudyInterrupted) as exc:
            run_study(s, plan_study(s), out, progress=ctrl_c)
        second = out / "cases" / "lora_late-1"
        interrupted = {"error": exc.value, "first": (out / "cases" / "lora_all" / "case.json").read_text(),
                       "second_done": (second / "case.json").is_file(),
                       "memory": (second / "memory.json").read_text()}
        code = main(_argv(disks, out, "--resume"))
    return {"out": out, "interrupted": interrupted, "resume_code": code,
            "results": json.loads((out / "results.json").read_text())}


def _cases(study) -> dict:
    return {c["case"]: c for c in study["results"]["cases"]}


def test_interrupted_study_keeps_finished_cases_and_resumes(study):
    it = study["interrupted"]
    assert it["error"].exit_code == 130
    assert "--resume" in str(it["error"]) and "1 of 3 case(s) finished" in str(it["error"]), it["error"]
    assert not it["second_done"]
    assert study["resume_code"] == 0
    # the finished case was kept as it was, not measured again; the interrupted one continued from its checkpoint
    # with the memory figures it had measured
    out = study["out"]
    assert (out / "cases" / "lora_all" / "case.json").read_text() == it["first"]
    assert (out / "cases" / "lora_late-1" / "memory.json").read_text() == it["memory"]
    assert study["results"]["resumed_cases"] == 1
    assert _cases(study)["lora late:1"]["steps"] == STEPS
    summary = json.loads((out / "cases" / "lora_late-1" / "run" / "summary.json").read_text())
    assert summary["iterations"] == STEPS


def test_worker_gets_ctrl_c_and_ends(tmp_path):
    """Ctrl-C in the parent reaches a worker in its own session once; the parent waits for it, then re-raises."""
    import threading

    from peft_export.bench.common import run_worker

    prev = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may start pytest with SIGINT ignored
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.monotonic()
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            run_worker("subprocess:run", {"args": ["sleep", "60"]}, log=tmp_path / "log")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, prev)
    assert time.monotonic() - t0 < 30
    assert "KeyboardInterrupt" in (tmp_path / "log").read_text()


def _encoder_trainables(placement: str) -> int:
    """Independent count: LoRA (rank 4) applied directly to a fresh tinyvit_tiny, not through the study."""
    from peft_export.models.registry import build_sam
    from peft_export.peft import PeftConfig, apply_peft

    sam = build_sam("tinyvit_tiny")
    for p in sam.parameters():
        p.requires_grad_(False)
    apply_peft(sam, PeftConfig("lora", placement, {"rank": 4}), "tinyvit_tiny")
    return sum(p.numel() for p in sam.image_encoder.parameters() if p.requires_grad)


def test_study_results_schema_and_ratios(study):
    res = study["results"]
    assert res["kind"] == "study" and res["machine"]["cpu"] and res["machine"]["cpu_count"]
    s = res["settings"]
    assert s["model"] == "tinyvit_tiny" and s["budget"] == f"{STEPS} steps" and s["baseline"] == "lora all"
    cases = _cases(study)
    assert list(cases) == ["lora all", "lora late:1", "lora late:9"]
    assert "4 encoder blocks" in cases["lora late:9"]["skipped"] and "box_iou" not in cases["lora late:9"]
    base = cases["lora all"]
    for name, placement in (("lora all", "all"), ("lora late:1", "late:1")):
        c = cases[name]
        assert c["steps"] == STEPS and c["torch_threads"] == 1  # the workers' OMP_NUM_THREADS, recorded
        for key in ("box_iou", "point_iou", "box_msa", "point_msa"):
            assert 0 <= c[key] <= 1, (key, c)
        assert c["mean_iou"] == pytest.approx((c["box_iou"] + c["point_iou"]) / 2, abs=1e-4)
        assert c["box_objects"] == 4 and c["step_median_s"] > 0 and c["train_seconds"] > 0
        assert c["peak_memory_mib"] >= c["setup_memory_mib"] > 50
        assert c["train_memory_mib"] == pytest.approx(c["peak_memory_mib"] - c["setup_memory_mib"], abs=0.2)
        assert c["trainable_encoder_params"] == _encoder_trainables(placement)
        for key, ratio in (("step_median_s", "step_vs_baseline"), ("peak_memory_mib", "memory_vs_baseline"),
                           ("train_memory_mib", "train_memory_vs_baseline")):
            assert c[ratio] == pytest.approx(c[key] / base[key], rel=0.01, abs=2e-3), ratio
        assert c["mean_iou_vs_baseline"] == pytest.approx(c["mean_iou"] - base["mean_iou"], abs=2e-4)
        assert f"--blocks {placement}" in c["finetune"] and f"--iterations {STEPS}" in c["finetune"]
    assert base["step_vs_baseline"] == 1.0 and base["memory_vs_baseline"] == 1.0
    assert cases["lora late:1"]["trainable_encoder_params"] < base["trainable_encoder_params"]
    with open(study["out"] / "results.csv", newline="") as f:
        assert [r["case"] for r in csv.DictReader(f)] == list(cases)
    table = (study["out"] / "table.md").read_text()
    assert all(name in table for name in cases) and "Recommendation" in table and res["machine"]["cpu"] in table


def test_study_quality_is_the_final_model_on_the_validation_split(study, disks):
    """The figures reported are `evaluate`'s on the validation images, for the model after the last step."""
    from peft_export.data.dataset import load_samples
    from peft_export.loading import load_model
    from peft_export.models.registry import get_spec
    from peft_export.models.torch_backend import TorchBackend
    from peft_export.runtime.evaluate import evaluate

    spec = get_spec("tinyvit_tiny")
    for name, slug in (("lora late:1", "lora_late-1"),):
        model = load_model(str(study["out"] / "cases" / slug / "run" / "latest.pt")).model.eval()
        ref = evaluate(TorchBackend(model, spec.preprocess, multimask=spec.multimask),
                       load_samples(str(disks), "val"), ["box", "point"])
        c = _cases(study)[name]
        assert c["box_iou"] == pytest.approx(ref["box"]["mean_iou"], abs=1e-3)
        assert c["point_iou"] == pytest.approx(ref["point"]["mean_iou"], abs=1e-3)
        assert c["box_msa"] == pytest.approx(ref["box"]["msa"], abs=1e-3)


def test_study_recommendation_follows_the_rule(study):
    res = study["results"]
    rows = [c for c in res["cases"] if "skipped" not in c]
    margin = res["settings"]["margin"]
    best = max(r["mean_iou"] for r in rows)
    eligible = [r for r in rows if r["mean_iou"] >= best - margin - 1e-12]
    expected = min(eligible, key=lambda r: (r["peak_memory_mib"], r["step_median_s"]))
    rec = res["recommendation"]
    assert rec["case"] == expected["case"] and rec["cost"] == "peak_memory" and rec["metric"] == "mean_iou"
    assert set(rec["eligible"]) == {r["case"] for r in eligible}
    assert rec["finetune"].startswith("peft-export finetune ") and f"--blocks {expected['placement']}" in \
        rec["finetune"]
    assert (study["out"] / "study.png").read_bytes()[:8] == PNG_MAGIC


def test_resumed_study_refuses_other_settings_and_plain_rerun(study, disks, run_cli):
    out = study["out"]
    before = (out / "results.json").read_text()
    code, _, err = run_cli(*_argv(disks, out))
    assert code == 2 and "--resume" in err and "--force" in err and len(err.strip().splitlines()) == 1, err
    argv = _argv(disks, out, "--resume")
    argv[argv.index("--budget") + 1] = "5"
    code, _, err = run_cli(*argv)
    assert code == 2 and "budget" in err and "differ" in err, err
    assert (out / "results.json").read_text() == before


# ---- the rule, the front, the plot, budgets: no training -------------------------------------------------------

def _row(name, quality, mem, step, method="lora"):
    placement = name.split()[-1]
    return {"case": name, "method": method, "placement": placement, "mean_iou": quality, "peak_memory_mib": mem,
            "train_memory_mib": mem / 2, "step_median_s": step}


def test_recommendation_rule_and_pareto_front():
    from peft_export.bench.study_results import pareto_front, recommend

    rows = [_row("lora all", 0.80, 3000, 4.0), _row("lora late:50%", 0.79, 2000, 2.5),
            _row("lora late:1", 0.70, 1500, 2.0), _row("ssf late:50%", 0.785, 2000, 2.4, "ssf")]
    rec = recommend(rows, "mean_iou", "peak_memory", 0.02)
    assert rec["case"] == "ssf late:50%"  # same memory as lora late:50%: the shorter step wins the tie
    assert rec["best_case"] == "lora all" and rec["cost_vs_best"] == pytest.approx(2000 / 3000, abs=1e-3)
    assert set(rec["eligible"]) == {"lora all", "lora late:50%", "ssf late:50%"}
    assert recommend(rows, "mean_iou", "peak_memory", 0.0)["case"] == "lora all"
    assert recommend(rows, "mean_iou", "peak_memory", 0.2)["case"] == "lora late:1"
    assert recommend(rows, "mean_iou", "step_time", 0.02)["case"] == "ssf late:50%"
    assert recommend([], "mean_iou", "peak_memory", 0.02)["case"] is None
    assert set(pareto_front(rows, "mean_iou", "peak_memory_mib")) == {"lora all", "lora late:50%", "lora late:1"}


def test_study_plot_from_results(tmp_path):
    from peft_export.bench.plots import plot_study
    from peft_export.bench.study import StudySettings
    from peft_export.bench.study_results import assemble

    rows = [_row("lora all", 0.80, 3000, 4.0), _row("lora late:1", 0.78, 1500, 2.0),
            {"case": "lora late:99", "method": "lora", "placement": "late:99", "skipped": "does not fit"}]
    res = assemble(rows, StudySettings(model="lite_medsam"))
    assert res["machine"]["cpu"] and res["recommendation"]["case"] == "lora late:1"
    png = plot_study(tmp_path / "s.png", res)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10000


def test_budget_parsing():
    from peft_export.bench.study import Budget
    from peft_export.errors import UsageError

    assert Budget.parse("30") == Budget(steps=30) and Budget.parse("30 steps") == Budget(steps=30)
    assert Budget.parse("5min").seconds == 300 and Budget.parse("90s").seconds == 90
    assert Budget.parse("2min").iterations([10.0, 12.0, 50.0]) == 10  # median step 12 s
    assert Budget.parse(str(Budget.parse("1.5 min"))) == Budget(seconds=90)
    assert Budget.parse("1s").iterations([]) == 1 and Budget.parse("1s").iterations([5.0]) == 1
    for bad in ("0", "0min", "-3", "abc", "2.5"):
        with pytest.raises(UsageError, match="budget"):
            Budget.parse(bad)


# ---- bad input: one line, nothing written ----------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--budget", "0"], "--budget must be more than zero"),
    (["--methods", "lorra"], "unknown PEFT method 'lorra'"),
    (["--metric", "ais_msa"], "--instance-decoder"),
    (["--metric", "dice"], "--metric"),
    (["--model", "vit_b"], "--checkpoint"),
    (["--placements", "late:x"], "placement"),
])
def test_study_bad_options(tmp_path, disks, run_cli, args, expected):
    argv = _argv(disks, tmp_path / "r")
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, _, err = run_cli(*argv)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_study_data_without_validation_split(tmp_path, run_cli):
    data = write_folder(tmp_path / "flat", splits=(("", 2),))
    code, _, err = run_cli(*_argv(data, tmp_path / "r"))
    assert code == 2 and "no validation split" in err and "--val" in err and "train/ and val/" in err, err
    assert not (tmp_path / "r").exists()


def test_study_with_the_instance_decoder_reports_ais(study, tmp_path, disks, run_cli, monkeypatch):
    """--instance-decoder reaches finetune (trained with it, one step) and its AIS figures become columns."""
    from peft_export.bench.study_case import quality_figures

    val = {"box": {"mean_iou": 0.8, "msa": 0.6, "objects": 4}, "instance": {"msa": 0.5, "f1": 0.7, "recall": 0.6}}
    assert quality_figures(val) == {"box_iou": 0.8, "box_msa": 0.6, "box_objects": 4.0, "ais_msa": 0.5,
                                    "ais_f1": 0.7, "ais_recall": 0.6}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = _argv(disks, tmp_path / "r", "--instance-decoder", "--metric", "ais_msa")
    argv[argv.index("--placements") + 1] = "late:1"
    argv[argv.index("--budget") + 1] = "1"
    code, _, err = run_cli(*argv)
    assert code == 0, err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    case = res["cases"][0]
    assert 0 <= case["ais_msa"] <= 1 and case["ais_objects_true"] == 4  # the validation image's 4 disks
    assert "--instance-decoder" in case["finetune"] and res["recommendation"]["metric"] == "ais_msa"
    # the decoder is trained too: same encoder adapters, more trainable parameters than the study without it
    without = _cases(study)["lora late:1"]
    assert case["trainable_encoder_params"] == without["trainable_encoder_params"] == _encoder_trainables("late:1")
    assert case["trainable_params"] > without["trainable_params"]
    assert "AIS mSA" in (tmp_path / "r" / "table.md").read_text()


def test_study_that_measures_nothing_fails_with_the_reasons(tmp_path, disks, run_cli):
    argv = _argv(disks, tmp_path / "r")
    argv[argv.index("--placements") + 1] = "late:9"
    code, _, err = run_cli(*argv)
    assert code == 1 and "nothing was measured" in err and "4 encoder blocks" in err, err
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["recommendation"]["case"] is None and "skipped" in results["cases"][0]
