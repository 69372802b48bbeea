"""`rlengine strength` end to end on the synthetic task (small settings: the numbers are checked
against the files, not against the paper), and rlengine.data.write_preferences."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import math
from pathlib import Path

import pytest
import torch

from rlengine import cli
from rlengine.data import PreferencePair, load_preferences, write_preferences
from rlengine.reward import RewardTrainerConfig, preference_strength, vote
from rlengine.reward.job import RewardJobConfig, build_job
from rlengine.reward.strength import roc_auc
from rlengine.reward.strength_report import decile_indices
from rlengine.synthetic import SyntheticTask

VOTERS = 3
PAIRS = 400
SETTINGS = ["--synthetic-pairs", str(PAIRS), "--synthetic-eval-pairs", "200", "--steps", "40",
            "--threads", "1", "--progress", "false"]
STRENGTH_ARGS = ["strength", "--voters", str(VOTERS), "--decile-steps", "10", *SETTINGS]


def quadratic_roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The definition, over every (positive, negative) pair: the reference for roc_auc."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    greater = (pos[:, None] > neg[None]).double().mean()
    equal = (pos[:, None] == neg[None]).double().mean()
    return float(greater + 0.5 * equal)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def strength_run(tmp_path_factory, one_thread):
    output = tmp_path_factory.mktemp("strength")
    printed = _run([*STRENGTH_ARGS, "--output-dir", str(output)])
    return output, printed


def _d_columns(pairs: list[PreferencePair]) -> torch.Tensor:
    return torch.tensor([[p.extra[f"strength_d{m}"] for p in pairs] for m in range(VOTERS)],
                        dtype=torch.float64)


# ---- the command ------------------------------------------------------------------------------


@pytest.mark.slow
def test_strength_writes_pairs_with_strength_columns(strength_run):
    output, printed = strength_run
    for name in ("strength.jsonl", "deciles.md", "deciles.json", "summary.json",
                 "plots/strength_histogram.png", "plots/decile_accuracy.png"):
        assert (output / name).is_file(), name
    assert sorted(p.name for p in output.glob("voter-*")) == [f"voter-{m}" for m in range(VOTERS)]
    assert "share of pairs with mu < 0" in printed

    pairs = load_preferences(output / "strength.jsonl")
    original = SyntheticTask(0).preference_pairs(PAIRS, flip_fraction=0.2, seed=1)
    assert len(pairs) == PAIRS
    for got, want in zip(pairs, original):
        assert (got.prompt, got.chosen, got.rejected, got.margin) == (
            want.prompt, want.chosen, want.rejected, want.margin)
        assert {k: v for k, v in got.extra.items() if not k.startswith("strength_")} == want.extra
        assert set(got.extra) - set(want.extra) == {
            "strength_mu", "strength_sigma", *(f"strength_d{m}" for m in range(VOTERS))}
    mu, sigma = preference_strength(_d_columns(pairs))
    assert torch.equal(mu, torch.tensor([p.extra["strength_mu"] for p in pairs],
                                        dtype=torch.float64))
    assert torch.equal(sigma, torch.tensor([p.extra["strength_sigma"] for p in pairs],
                                           dtype=torch.float64))


@pytest.mark.slow
def test_a_voter_retrained_with_its_seed_gives_its_column(strength_run):
    output, _ = strength_run
    pairs = load_preferences(output / "strength.jsonl")
    job = build_job(RewardJobConfig(synthetic_pairs=PAIRS, synthetic_eval_pairs=200, threads=1),
                    log=lambda *_: None)
    # voter 1 of the run: seed 1 and model 1; retrained alone here as "voter 0" of seed 1
    config = RewardTrainerConfig(steps=40, lr=2e-3, seed=1, progress=False)
    again = vote(lambda m: job.make_model(m + 1), job.tokenizer, job.train_pairs, config,
                 voters=1, log=lambda *_: None, **job.trainer_kwargs())
    torch.testing.assert_close(again.differences[0], _d_columns(pairs)[1], rtol=0, atol=1e-6)
    assert again.metrics[0]["clean"]["pairs"] == 200


@pytest.mark.slow
def test_decile_table_and_summary_agree_with_the_pairs(strength_run):
    output, printed = strength_run
    pairs = load_preferences(output / "strength.jsonl")
    mu = torch.tensor([p.extra["strength_mu"] for p in pairs], dtype=torch.float64)
    sigma = torch.tensor([p.extra["strength_sigma"] for p in pairs], dtype=torch.float64)
    flipped = torch.tensor([p.extra["flipped"] for p in pairs])
    agrees = torch.tensor([p.extra["gold_prefers_chosen"] for p in pairs])
    deciles = json.loads((output / "deciles.json").read_text())
    rows = deciles["rows"]
    assert deciles["validation_set"] == "clean" and deciles["decile_steps"] == 10
    order = torch.sort(mu, stable=True).indices
    assert [row["pairs"] for row in rows] == [PAIRS // 10] * 10
    for k, row in enumerate(rows):
        group = order[k * PAIRS // 10:(k + 1) * PAIRS // 10]
        assert row["decile"] == k + 1
        assert row["mu_min"] == float(mu[group].min()) and row["mu_max"] == float(mu[group].max())
        assert row["mu_mean"] == pytest.approx(float(mu[group].mean()), abs=1e-12)
        assert row["sigma_mean"] == pytest.approx(float(sigma[group].mean()), abs=1e-12)
        assert row["share_mu_negative"] == float((mu[group] < 0).double().mean())
        assert row["share_flipped"] == float(flipped[group].double().mean())
        assert row["label_agreement"] == float(agrees[group].double().mean())
        assert row["label_agreement_column"] == "gold_prefers_chosen"
        assert 0.0 <= row["validation_accuracy"] <= 1.0
    # even 3 short voters push flipped labels to the bottom (20% of all pairs are flipped).
    # Over 10 seeds x 4 CPU code paths: the first decile 45-70% flipped (mean 59%, sd 6.6%),
    # the last 0-15%; bench/results/outcome-spread-2026-12-07.md
    assert rows[0]["share_flipped"] > 0.3 > rows[-1]["share_flipped"]

    summary = json.loads((output / "summary.json").read_text())
    assert summary["pairs"] == PAIRS and summary["voters"] == VOTERS
    assert summary["seeds"] == [0, 1, 2]
    assert summary["share_mu_negative"] == float((mu < 0).double().mean())
    assert summary["flipped_pairs"] == int(flipped.sum()) == 80
    assert summary["flipped_auc"] == pytest.approx(quadratic_roc_auc(-mu, flipped), abs=1e-12)
    # over the same runs: 0.638-0.803 (mean 0.728, sd 0.036); random scores: 0.5 +- 0.036
    assert summary["flipped_auc"] > 0.6
    assert summary["decile_validation_accuracy"] == [row["validation_accuracy"] for row in rows]
    assert summary["validation_set"] == "clean" and summary["validation_pairs"] == 200
    assert len(summary["voter_validation_accuracy"]["clean"]) == VOTERS
    assert summary["deciles"] == rows

    # the printed table is the saved one, one line per decile
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 12 and "accuracy on clean" in table[0]
    assert "\n".join(table) in (output / "deciles.md").read_text()
    assert table[2].split("|")[1].strip() == "1"
    assert f"{rows[0]['share_flipped']:.3f}" in table[2]


@pytest.mark.slow
def test_plots_are_png_images(strength_run):
    from PIL import Image

    output, _ = strength_run
    for name in ("strength_histogram.png", "decile_accuracy.png"):
        path = output / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 300


@pytest.mark.slow
def test_a_second_run_resumes_every_voter_and_writes_the_same(strength_run):
    output, _ = strength_run
    before = {name: (output / name).read_bytes()
              for name in ("strength.jsonl", "deciles.json", "summary.json")}
    printed = _run([*STRENGTH_ARGS, "--output-dir", str(output)])
    assert printed.count("resumed from") == VOTERS + 10
    for name, content in before.items():
        assert (output / name).read_bytes() == content, name


@pytest.mark.slow
def test_train_rm_uses_the_strength_file(strength_run, tmp_path):
    output, _ = strength_run
    clean = write_preferences(SyntheticTask(0).clean_pairs(64, seed=100), tmp_path / "clean.jsonl")
    printed = _run(["train-rm", "--train", str(output / "strength.jsonl"), "--eval",
                    f"clean={clean}", "--margin", "strength", "--smoothing-on",
                    "negative_strength", "--label-smoothing", "0.2", "--flip-lowest", "0.1",
                    "--steps", "5", "--batch-size", "16", "--threads", "1", "--progress",
                    "false", "--output-dir", str(tmp_path / "rm")])
    # flip_lowest 0.1 of 400 pairs; smoothing on those left with mu < 0 after the flip
    assert "flipped 40" in printed
    metrics = json.loads((tmp_path / "rm" / "final_metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["metrics"]["clean"]["pairs"] == 64


def test_strength_needs_an_output_dir(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["strength", "--voters", "2"])
    assert info.value.code == 2
    assert "strength needs output_dir (--output-dir)" in capsys.readouterr().err


@pytest.mark.parametrize("options, named", [
    (["--margin", "strength"], "margin=strength"),
    (["--flip-lowest", "0.1"], "flip_lowest=0.1"),
    (["--drop-lowest", "0.2"], "drop_lowest=0.2"),
    (["--label-smoothing", "0.2", "--smoothing-on", "negative_strength"],
     "smoothing_on=negative_strength"),
])
def test_strength_refuses_the_strength_options(tmp_path, capsys, options, named):
    with pytest.raises(SystemExit) as info:
        cli.main(["strength", "--output-dir", str(tmp_path), *options])
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert "cannot be used with it" in error and named in error
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("options, reason", [
    (["--voters", "0"], "voters must be >= 1, got 0"),
    (["--decile-steps", "-1"], "decile_steps must be >= 0"),
])
def test_strength_argument_errors(tmp_path, capsys, options, reason):
    with pytest.raises(SystemExit) as info:
        cli.main(["strength", "--output-dir", str(tmp_path), *options])
    assert info.value.code == 2 and reason in capsys.readouterr().err


def test_decile_indices_and_roc_auc():
    mu = torch.tensor([3.0, -1.0, 2.0, 2.0, 0.5, -4.0, 1.0, 7.0, 0.0, 2.0, 5.0, -2.0])
    groups = decile_indices(mu, groups=5)
    assert [len(g) for g in groups] == [2, 2, 3, 2, 3]
    assert torch.cat(groups).tolist() == torch.sort(mu, stable=True).indices.tolist()
    with pytest.raises(ValueError, match="12 pairs cannot make 20 deciles"):
        decile_indices(mu, groups=20)
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=generator).double()  # many ties
    positive = torch.rand(300, generator=generator) < 0.3
    assert roc_auc(scores, positive) == pytest.approx(quadratic_roc_auc(scores, positive),
                                                      abs=1e-12)
    assert math.isnan(roc_auc(scores, torch.zeros(300, dtype=torch.bool)))


# ---- write_preferences ------------------------------------------------------------------------

USER = {"role": "user", "content": "Name a prime."}
SYSTEM = {"role": "system", "content": "Be brief."}
GOOD = {"role": "assistant", "content": "7", "reasoning": "small"}  # extra keys are kept
BAD = {"role": "assistant", "content": "8"}


def _same(got: list[PreferencePair], want: list[PreferencePair]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.prompt, g.chosen, g.rejected, g.margin, g.extra) == (
            w.prompt, w.chosen, w.rejected, w.margin, w.extra)


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz", "pairs.ndjson"])
def test_write_preferences_round_trip(tmp_path, name):
    pairs = [
        PreferencePair("2 + 2 =", " 4", " 5", margin=1.5,
                       extra={"id": 7, "tags": ["math"], "meta": {"rater": "a"}, "ok": True,
                              "note": None, "text": "naïve \u2028 \"q\"\n"}),
        PreferencePair(None, "The whole text, scored whole.", "Another text.", margin=-0.25),
        PreferencePair("Say nothing.", "", "Something."),  # an empty answer, kept
        PreferencePair([SYSTEM, USER], [GOOD], [BAD], extra={"strength_mu": -0.125}),
        PreferencePair([USER, GOOD, USER], [BAD, {"role": "user", "content": "ok?"}, GOOD],
                       [GOOD]),
    ]
    path = write_preferences(pairs, tmp_path / "out" / name)
    assert path == tmp_path / "out" / name
    loaded = load_preferences(path)
    _same(loaded, pairs)
    assert [p.source.row for p in loaded] == [1, 2, 3, 4, 5]
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary left behind
    # what was read writes back to the same bytes (gzip: no time stamp in the header)
    again = write_preferences(loaded, tmp_path / "again" / name)
    assert again.read_bytes() == path.read_bytes()


def test_write_preferences_rows_are_plain_json(tmp_path):
    pair = PreferencePair(None, "a", "b", extra={"score": torch.tensor(0.5),
                                                 "count": torch.tensor(3)})
    path = write_preferences([pair], tmp_path / "p.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as file:
        assert json.loads(file.read()) == {"chosen": "a", "rejected": "b", "score": 0.5,
                                           "count": 3}


def test_write_preferences_errors_keep_the_old_file(tmp_path):
    path = write_preferences([PreferencePair("p", "c", "r")], tmp_path / "p.jsonl")
    content = path.read_bytes()

    def failing():
        yield PreferencePair("p", "c2", "r2")
        raise RuntimeError("the data source broke")

    bad = [
        ([PreferencePair("p", "c", "r", extra={"margin": 1.0})],
         "pair 0: extra column 'margin' would overwrite"),
        ([PreferencePair("p", "c", "r"), PreferencePair("p", "c", "r", extra={"x": math.nan})],
         "pair 1, column 'x' is nan: not a finite number"),
        ([PreferencePair("p", "c", "r", extra={"x": {"y": [1.0, math.inf]}})],
         "column 'x' is inf"),
        ([PreferencePair("p", "c", "r", extra={"x": object()})], "cannot be written as JSON"),
        ([{"prompt": "p"}], "pair 0: expected a PreferencePair, got dict"),
    ]
    for pairs, message in bad:
        with pytest.raises(ValueError, match=message):
            write_preferences(pairs, path)
    with pytest.raises(RuntimeError, match="broke"):
        write_preferences(failing(), path)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]
    with pytest.raises(ValueError, match=r"must end with \.jsonl, \.jsonl\.gz, \.ndjson"):
        write_preferences([], tmp_path / "p.parquet")


def test_write_preferences_keeps_the_source_in_errors(tmp_path):
    pair = dataclasses.replace(SyntheticTask(0).clean_pairs(1)[0], extra={"bad": math.nan})
    with pytest.raises(ValueError, match=r"pair 0 \(synthetic:pairs/seed=0:0\)"):
        write_preferences([pair], Path(tmp_path) / "x.jsonl")
