"""The location-aware normalizer: METHODS.md's worked example, Huber regression that ignores
outliers least squares follows, recovery of known parameters from segment rewards with outlier
locations, agreement with the dense-reward op, the JSON round trip, segment-reward collection
on the synthetic task, and `rlengine fit-normalizer` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlengine import cli, ops
from rlengine.policy import (
    LocationNormalizer,
    collect_segment_rewards,
    huber_line_fit,
    location_statistics,
)
from rlengine.policy.job import synthetic_task
from rlengine.reward import RewardModel

torch.set_num_threads(1)
PHI3 = LocationNormalizer(0.7668, 0.4705, 0.2569, 2.8339)


def test_methods_example():
    assert PHI3.mu(0.1) == pytest.approx(-1.2951, abs=1e-4)
    assert PHI3.sigma(0.1) == pytest.approx(2.2424, abs=1e-4)
    assert PHI3.mu(1.0) == pytest.approx(0.4705) and PHI3.sigma(1.0) == pytest.approx(2.8339)
    # the dense-reward op normalizes with the same parameters: one segment at p = 1 and, in a
    # row of 10 segments, the first at p = 0.1
    dense = ops.segment_rewards_to_dense(torch.tensor([[3.0]]), torch.tensor([[0]]),
                                         torch.tensor([1]), torch.ones(1, 1, dtype=torch.bool),
                                         normalizer=PHI3.parameters, clamp=None)
    assert dense.item() == pytest.approx((3.0 - 0.4705) / 2.8339, rel=1e-6)
    rewards = torch.full((1, 10), 1.0)
    ids = torch.arange(10).view(1, 10)
    dense = ops.segment_rewards_to_dense(rewards, ids, torch.tensor([10]),
                                         torch.ones(1, 10, dtype=torch.bool),
                                         normalizer=PHI3.parameters, clamp=None)
    assert dense[0, 0].item() == pytest.approx((1.0 + 1.2951) / 2.2424, abs=1e-4)


def test_huber_fit_ignores_outliers_that_least_squares_follows():
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(-3, 0, 40, dtype=torch.float64)
    y = 0.8 * x + 0.3 + 0.05 * torch.randn(40, generator=generator, dtype=torch.float64)
    y[::8] += 6.0  # 5 gross outliers
    slope, intercept = huber_line_fit(x, y)
    assert slope == pytest.approx(0.8, abs=0.05) and intercept == pytest.approx(0.3, abs=0.05)
    design = torch.stack([x, torch.ones_like(x)], 1)
    least_squares = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    assert abs(float(least_squares[1]) - 0.3) > 0.3
    # exact data: exact line; weights count repeated points
    assert huber_line_fit(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == \
        pytest.approx((2.0, 0.0))
    with pytest.raises(ValueError, match="2 or more distinct x"):
        huber_line_fit(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]))


def _segment_rewards(parameters, generator, *, responses_per_k=80, max_k=20):
    a_mu, b_mu, a_sigma, b_sigma = parameters
    locations, rewards = [], []
    for count in range(1, max_k + 1):
        p = torch.arange(1, count + 1, dtype=torch.float64) / count
        mu, sigma = a_mu * p.log() + b_mu, a_sigma * p.log() + b_sigma
        noise = torch.randn(responses_per_k, count, generator=generator, dtype=torch.float64)
        locations.append(p.expand(responses_per_k, count).reshape(-1))
        rewards.append((mu + sigma * noise).reshape(-1))
    return torch.cat(locations), torch.cat(rewards)


def test_fit_recovers_known_parameters_despite_outlier_locations():
    generator = torch.Generator().manual_seed(1)
    truth = (0.6, -0.2, 0.3, 1.4)
    p, r = _segment_rewards(truth, generator)
    corrupted = (p > 0.40) & (p < 0.46)  # a band of locations whose rewards are way off
    r = torch.where(corrupted, r + 15.0, r)
    fitted = LocationNormalizer.fit(p, r, threshold=1.75, model="m")
    assert fitted.parameters == pytest.approx(truth, abs=0.06)
    assert (fitted.threshold, fitted.model, fitted.n) == (1.75, "m", len(p))
    stats = location_statistics(p, r)
    assert stats.counts.sum() == len(p)  # every location has >= 2 segments: none left out
    # least squares on the same statistics is pulled far off by the corrupted band
    design = torch.stack([stats.locations.log(), torch.ones_like(stats.locations)], 1)
    root = stats.counts.sqrt().unsqueeze(1)
    least_squares = torch.linalg.lstsq(design * root, stats.means.unsqueeze(1) * root).solution
    assert abs(float(least_squares[1]) - truth[1]) > 0.3


def test_location_statistics_group_by_location():
    p = torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0, 1 / 3])
    r = torch.tensor([1.0, 3.0, 0.0, 0.0, 3.0, 9.0])
    stats = location_statistics(p, r)
    assert stats.locations.tolist() == pytest.approx([0.5, 1.0])  # 1/3 has one sample only
    assert stats.means.tolist() == pytest.approx([2.0, 1.0])
    assert stats.stds.tolist() == pytest.approx([1.0, math.sqrt(2.0)])
    assert stats.counts.tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"locations must be in \(0, 1\]"):
        location_statistics(torch.tensor([0.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="2 or more locations"):
        LocationNormalizer.fit(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]))


def test_json_round_trip_and_bad_files(tmp_path):
    path = PHI3.save(tmp_path / "n.json")
    assert LocationNormalizer.load(path) == PHI3
    data = json.loads(path.read_text())
    assert {"a_mu", "b_mu", "a_sigma", "b_sigma", "threshold", "model", "n"} <= set(data)
    (tmp_path / "bad.json").write_text('{"a_mu": 1, "b_mu": "x", "a_sigma": 1, "b_sigma": 1}')
    with pytest.raises(ValueError, match="bad.json: b_mu must be a finite number"):
        LocationNormalizer.load(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text('{"a_mu": 1}')
    with pytest.raises(ValueError, match="missing b_mu, a_sigma, b_sigma"):
        LocationNormalizer.load(tmp_path / "short.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LocationNormalizer.load(tmp_path / "none.json")


@pytest.fixture(scope="module")
def models():
    task = synthetic_task(0)
    policy = task.sft_policy()
    reward_model = RewardModel(task.make_reward_backbone(from_policy=policy)).eval()
    return task, policy, reward_model


@pytest.mark.parametrize("kernels", ["engine", "reference"])
def test_collect_segment_rewards_on_the_synthetic_task(models, kernels):
    task, policy, reward_model = models
    pairs = task.preference_pairs(12, seed=5)
    texts = [(p.prompt, side) for p in pairs for side in (p.chosen, p.rejected)]
    p, r = collect_segment_rewards(reward_model, policy, task.tokenizer, texts, threshold=1.0,
                                   batch_size=7, kernels=kernels)
    assert p.shape == r.shape and ((p > 0) & (p <= 1)).all() and torch.isfinite(r).all()
    # every non-empty response has exactly one segment at p = 1 (its last)
    nonempty = sum(1 for _, response in texts if response.split())
    assert int((p == 1).sum()) == nonempty
    # a huge threshold: one segment per response, its reward the value at the last word
    p_one, r_one = collect_segment_rewards(reward_model, policy, task.tokenizer, texts,
                                           threshold=1e9, kernels=kernels)
    assert len(p_one) == nonempty and (p_one == 1).all()


def test_fit_normalizer_command(models, tmp_path, capsys):
    task, policy, reward_model = models
    model_dir = reward_model.save_pretrained(tmp_path / "rm", task.tokenizer)
    out = tmp_path / "normalizer.json"
    code = cli.main(["fit-normalizer", "--reward-model", str(model_dir), "--output", str(out),
                     "--synthetic-pairs", "150", "--threshold", "1.0", "--threads", "1"])
    stdout = capsys.readouterr().out
    assert code == 0 and "written to" in stdout and "mu(p)" in stdout
    fitted = LocationNormalizer.load(out)
    assert fitted.threshold == 1.0 and fitted.model == str(model_dir) and fitted.n > 300
    assert all(math.isfinite(v) for v in fitted.parameters)
    # a data file of pairs with the entropy model as a folder
    policy_dir = tmp_path / "policy"
    policy.save_pretrained(policy_dir)
    task.tokenizer.save_pretrained(policy_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen,
                                         "rejected": p.rejected}) + "\n"
                             for p in task.preference_pairs(60, seed=9)))
    code = cli.main(["fit-normalizer", "--reward-model", str(model_dir), "--output",
                     str(tmp_path / "file.json"), "--data", str(pairs), "--entropy-model",
                     str(policy_dir), "--threshold", "1.0", "--threads", "1"])
    assert code == 0 and LocationNormalizer.load(tmp_path / "file.json").n > 100


@pytest.mark.parametrize("args, message", [
    ([], "reward_model is required"),
    (["--reward-model", "{tmp}/none", "--output", "{tmp}/o.json"], "is not a folder"),
    (["--reward-model", "{tmp}", "--output", "{tmp}/o.json"], "not a RewardModel checkpoint"),
    (["--threshold", "x"], "command line: --threshold: expected a number"),
])
def test_fit_normalizer_errors_exit_2(tmp_path, capsys, args, message):
    argv = ["fit-normalizer", *[a.format(tmp=tmp_path) for a in args]]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
