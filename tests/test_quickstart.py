"""`rlengine quickstart`: the whole pipeline at its --fast size writes a report whose tables,
findings and pictures agree with its metrics files and whose models load; a second run reuses
every stage; --rerun, --skip and --only do what they say; and the stage bookkeeping (reuse,
invalidation downstream, resume after an interruption) holds on small stand-in stages."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import main_exit

from rlengine.quickstart import settings as presets
from rlengine.quickstart.pipeline import Run, Stage, read_record, run_pipeline
from rlengine.quickstart.report import POLICY_RUNS, load_metrics

pytestmark = pytest.mark.slow

STAGES = ("kernels", "sft", "samples", "strength", "reward", "active", "rrhf", "ppo")
FAST = ["quickstart", "--fast", "--threads", "1", "--progress", "false"]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    from rlengine import cli

    assert cli.main([*FAST, "--out", str(out)]) == 0
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _table(text: str, header_start: str) -> dict[str, list[str]]:
    """The markdown table whose header begins with ``header_start``: first cell -> cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_every_stage_ran_and_the_report_has_its_sections(report_dir):
    text = (report_dir / "report.md").read_text()
    for heading in ("## Findings", "## Kernel speedups, measured live",
                    "## SFT policy and preference data", "## Preference strength",
                    "## Reward models", "## Active selection of comparisons",
                    "## Policy optimization", "## Files"):
        assert heading in text, heading
    for stage in STAGES:
        record = read_record(report_dir, stage)
        assert record is not None and record["status"] == "finished", stage
    # every picture the report shows exists and is a PNG of real size
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {Path(p).name for p in pictures} >= {"kernel_speedups.png", "rm_accuracy.png",
                                                "active_selection.png", "gold_reward.png",
                                                "strength_histogram.png"}
    for picture in pictures:
        data = (report_dir / picture).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, picture


def test_metrics_jsonl_is_every_stage_s_rows(report_dir):
    combined = _rows(report_dir / "metrics.jsonl")
    per_stage = [row for stage in STAGES for row in _rows(report_dir / stage / "metrics.jsonl")]
    assert combined == per_stage
    assert {row["stage"] for row in combined} == set(STAGES)


def test_report_tables_agree_with_the_metrics(report_dir):
    text = (report_dir / "report.md").read_text()
    m = load_metrics(report_dir / "metrics.jsonl")

    reward = _table(text, "model")
    assert set(reward) == {"plain", "soft_margin", "denoised", "segment"}
    for name, cells in reward.items():
        assert cells[1] == f"{m.get('reward', name, 'accuracy_untrained'):.3f}"
        assert cells[2] == f"{m.get('reward', name, 'accuracy'):.3f}"

    policy = _table(text, "run")
    assert set(policy) == set(POLICY_RUNS)
    for name, cells in policy.items():
        stage = "ppo" if name.startswith("ppo") else "rrhf"
        sampled = m.curve(stage, name, "gold_reward_sampled")
        greedy = m.curve(stage, name, "gold_reward_greedy")
        assert cells[1:5] == [f"{sampled[0][1]:.3f}", f"{sampled[-1][1]:.3f}",
                              f"{greedy[0][1]:.3f}", f"{greedy[-1][1]:.3f}"]
        assert cells[5] == str(sampled[-1][0])

    kernels = _table(text, "op [shape]")
    assert len(kernels) == 9
    for name, cells in kernels.items():
        assert cells[2] == f"{m.get('kernels', name, 'speedup'):.1f}x"
        assert float(cells[3]) < 1e-4, f"{name} differs from eager by {cells[3]}"

    samples = _table(text, "set")
    for name, cells in samples.items():
        assert int(cells[0]) == int(m.get("samples", name, "pairs"))
    assert samples["validation"][3] == "0.000"  # validation labels are the gold preference

    active = _table(text, "strategy")
    for strategy, cells in active.items():
        assert cells == [f"{v:.3f}" for _, v in m.curve("active", strategy, "accuracy")]

    findings = text.split("## Findings")[1].split("##")[0]
    plain, denoised = m.get("reward", "plain", "accuracy"), m.get("reward", "denoised",
                                                                   "accuracy")
    assert f"{denoised:.3f} against {plain:.3f}" in findings
    assert f"ROC AUC {m.get('strength', 'strength', 'auc_flipped'):.3f}" in findings


def test_metrics_agree_with_the_trainers_own_logs(report_dir):
    m = load_metrics(report_dir / "metrics.jsonl")
    for name in ("plain", "denoised", "segment"):
        evals = [r for r in _rows(report_dir / "reward" / name / "metrics.jsonl")
                 if "eval/clean/accuracy" in r]
        assert evals[-1]["eval/clean/accuracy"] == pytest.approx(m.get("reward", name,
                                                                       "accuracy"))
    for name in POLICY_RUNS:
        stage, folder = ("ppo", name) if name.startswith("ppo") else ("rrhf", "denoised_rm")
        logged = [r["eval/gold_reward_sampled"]
                  for r in _rows(report_dir / stage / folder / "metrics.jsonl")
                  if "eval/gold_reward_sampled" in r]
        assert logged == [v for _, v in m.curve(stage, name, "gold_reward_sampled")]
    # the annotator flipped the configured share of training labels
    pairs = _rows(report_dir / "samples" / "train_pairs.jsonl")
    flipped = sum(p["flipped"] for p in pairs) / len(pairs)
    assert flipped == pytest.approx(presets.FAST.flip_fraction, abs=1 / len(pairs))


def test_the_trained_models_load_and_work(report_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlengine.reward import RewardModel

    reward = RewardModel.load(report_dir / "reward" / "denoised" / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(report_dir / "sft" / "model")
    ids = tokenizer(["copy cat owl = cat owl"], return_tensors="pt")
    with torch.no_grad():
        values = reward(ids["input_ids"], ids["attention_mask"]).values
    assert values.shape == ids["input_ids"].shape and torch.isfinite(values).all()
    policy = AutoModelForCausalLM.from_pretrained(report_dir / "ppo" / "ppo_gold" / "model")
    out = policy.generate(**tokenizer(["copy cat owl ="], return_tensors="pt"),
                          max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1] - 2


def test_a_second_run_reuses_every_stage_and_rerun_forces_one(report_dir, capsys):
    before = {stage: read_record(report_dir, stage)["run_id"] for stage in STAGES}
    code, out, _ = main_exit([*FAST, "--out", str(report_dir)], capsys)
    assert code == 0
    for stage in STAGES:
        assert f"[{stage}] reused" in out, out
    assert {stage: read_record(report_dir, stage)["run_id"] for stage in STAGES} == before
    assert "ran: report" in out

    # the re-run stage on another thread count: the report gives each stage's
    threads = torch.get_num_threads()
    two_threads = [a if a != "1" else "2" for a in FAST]
    try:
        code, out, _ = main_exit([*two_threads, "--out", str(report_dir), "--rerun", "rrhf"],
                                 capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and "2 CPU threads (--threads)" in out
    after = {stage: read_record(report_dir, stage)["run_id"] for stage in STAGES}
    assert after["rrhf"] != before["rrhf"]
    assert {s: r for s, r in after.items() if s != "rrhf"} == \
        {s: r for s, r in before.items() if s != "rrhf"}
    assert read_record(report_dir, "rrhf")["threads"] == 2
    assert all(read_record(report_dir, s)["threads"] == 1 for s in STAGES if s != "rrhf")
    text = (report_dir / "report.md").read_text()
    stages = _table(text, "stage | finished")
    assert stages["rrhf"][-1] == "2" and stages["sft"][-1] == "1"
    assert "1 to 2 CPU threads (by stage: the table below)" in text


def test_only_and_skip(tmp_path, capsys):
    code, out, _ = main_exit([*FAST, "--out", str(tmp_path), "--only", "kernels"], capsys)
    assert code == 0
    assert "[sft] skipped" in out and "[ppo] not run: needs sft" not in out
    assert read_record(tmp_path, "kernels")["status"] == "finished"
    assert read_record(tmp_path, "sft") is None
    text = (tmp_path / "report.md").read_text()
    assert "## Kernel speedups" in text and "## Reward models" not in text
    code, _, err = main_exit([*FAST, "--out", str(tmp_path), "--skip", "kernels,training"],
                             capsys)
    assert code == 2 and "--skip: unknown stage(s) training" in err


# ---- the stage bookkeeping, on stand-in stages ----------------------------------------------

def _stages(calls: list[str], fail: set[str] | None = None) -> list[Stage]:
    def make(name: str):
        def body(run: Run):
            calls.append(name)
            folder = run.folder(name)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "partial").touch()
            if fail and name in fail:
                fail.discard(name)
                raise KeyboardInterrupt  # a run stopped mid-stage
            return [{"run": name, "metric": "value", "value": len(calls)}]
        return body

    return [Stage("a", "first", make("a"), settings=("seed",)),
            Stage("b", "needs a", make("b"), needs=("a",), settings=("voters",)),
            Stage("c", "independent", make("c"), settings=("task_seed",))]


def test_changed_settings_rerun_a_stage_and_what_read_it(tmp_path):
    calls: list[str] = []
    run_pipeline(_stages(calls), Run(tmp_path, presets.FAST, progress=False), skip=set(),
                 rerun=set())
    assert calls == ["a", "b", "c"]
    calls.clear()
    run_pipeline(_stages(calls), Run(tmp_path, presets.FAST, progress=False), skip=set(),
                 rerun=set())
    assert calls == []
    changed = presets.FAST.__class__(**{**presets.FAST.to_dict(), "seed": 5})
    run_pipeline(_stages(calls), Run(tmp_path, changed, progress=False), skip=set(),
                 rerun=set())
    assert calls == ["a", "b"]  # b read a's outputs; c did not
    calls.clear()
    run_pipeline(_stages(calls), Run(tmp_path, changed, progress=False), skip=set(),
                 rerun={"b"})
    assert calls == ["b"]


def test_an_interrupted_stage_keeps_its_folder_and_resumes(tmp_path):
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_stages(calls, fail={"b"}), Run(tmp_path, presets.FAST, progress=False),
                     skip=set(), rerun=set())
    assert read_record(tmp_path, "b")["status"] == "running"
    run_id = read_record(tmp_path, "b")["run_id"]
    (tmp_path / "b" / "checkpoint").touch()   # what a trainer would resume from
    calls.clear()
    run_pipeline(_stages(calls), Run(tmp_path, presets.FAST, progress=False), skip=set(),
                 rerun=set())
    assert calls == ["b", "c"]
    assert (tmp_path / "b" / "checkpoint").exists()
    assert read_record(tmp_path, "b")["run_id"] == run_id
    # an interrupted stage whose settings changed starts over in an empty folder
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_stages(calls, fail={"c"}), Run(tmp_path, presets.FAST, progress=False),
                     skip=set(), rerun={"c"})
    (tmp_path / "c" / "stale").touch()
    changed = presets.FAST.__class__(**{**presets.FAST.to_dict(), "task_seed": 9})
    run_pipeline(_stages(calls), Run(tmp_path, changed, progress=False), skip=set(),
                 rerun={"c"})
    assert not (tmp_path / "c" / "stale").exists()
    assert read_record(tmp_path, "c")["status"] == "finished"


def test_skipped_stages_lend_their_saved_outputs_and_missing_ones_block(tmp_path):
    calls: list[str] = []
    outcomes = run_pipeline(_stages(calls), Run(tmp_path / "fresh", presets.FAST,
                                                progress=False), skip={"a"}, rerun=set())
    assert [o.status for o in outcomes] == ["skipped", "missing", "ran"]
    run_pipeline(_stages(calls), Run(tmp_path / "fresh", presets.FAST, progress=False),
                 skip=set(), rerun=set())
    calls.clear()
    outcomes = run_pipeline(_stages(calls), Run(tmp_path / "fresh", presets.FAST,
                                                progress=False), skip={"a"}, rerun={"b"})
    assert [o.status for o in outcomes] == ["saved", "ran", "reused"] and calls == ["b"]
    # a damaged record is a stage to run again
    (tmp_path / "fresh" / "c" / "stage.json").write_text("{not json")
    calls.clear()
    run_pipeline(_stages(calls), Run(tmp_path / "fresh", presets.FAST, progress=False),
                 skip=set(), rerun=set())
    assert calls == ["c"]
