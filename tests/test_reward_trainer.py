"""RewardTrainer and its parts (rlengine.reward.{trainer,config,denoise,metarm}) on the synthetic
task: tiny random-init backbones, a few dozen pairs, a few steps. Every loss, score and update is
checked against a recomputation written from METHODS.md, not from the trainer's code."""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlengine import ops
from rlengine.data.types import PreferencePair
from rlengine.reward.config import RewardTrainerConfig
from rlengine.reward.denoise import prepare_pairs
from rlengine.reward.losses import metarm_difference_objective, simcse_loss, swav_loss
from rlengine.reward.metarm import MetaAscent, metarm_step
from rlengine.reward.model import RewardModel
from rlengine.reward.trainer import RewardTrainer, pair_metrics
from rlengine.synthetic import SyntheticTask
from rlengine.synthetic.models import ModelConfig
from rlengine.training import CheckpointManager
from rlengine.training.loop import step_seed
from rlengine.training.metrics import read_metrics
from rlengine.training.schedules import lr_multiplier

TASK = SyntheticTask(0)
# The same task (same tokenizer and data) with dropout in the backbone, for contrastive views.
DROPOUT_TASK = SyntheticTask(0, model=ModelConfig(dropout=0.2))
TOKENIZER = TASK.tokenizer
EOS = TOKENIZER.eos_token_id


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _with_columns(pairs: list[PreferencePair], seed: int) -> list[PreferencePair]:
    """The pairs with a strength column (random mu, a quarter of them negative-ish) and a
    margin column on every other pair."""
    generator = torch.Generator().manual_seed(seed)
    mu = (torch.randn(len(pairs), generator=generator, dtype=torch.float64) + 0.7).tolist()
    margins = torch.rand(len(pairs), generator=generator, dtype=torch.float64).tolist()
    return [dataclasses.replace(p, margin=margins[i] if i % 2 == 0 else None,
                                extra={**p.extra, "strength_mu": mu[i]})
            for i, p in enumerate(pairs)]


TRAIN = _with_columns(TASK.preference_pairs(64, seed=1), seed=1)
EVAL_A = TASK.clean_pairs(24, seed=2)
EVAL_B = TASK.preference_pairs(16, seed=3)
META = [(example.prompt, example.responses) for example in TASK.ranked_examples(6, k=4, seed=4)]


def _config(**overrides) -> RewardTrainerConfig:
    options = dict(batch_size=8, steps=4, lr=2e-3, log_every=1, progress=False, seed=0)
    options.update(overrides)
    return RewardTrainerConfig(**options)


def _model(seed: int = 0, task: SyntheticTask = TASK) -> RewardModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the value head's init draws from the global RNG
        return RewardModel(task.make_reward_backbone(seed))


def _trainer(config: RewardTrainerConfig, pairs=TRAIN, *, model_seed: int = 0,
             task: SyntheticTask = TASK, **kwargs) -> RewardTrainer:
    kwargs.setdefault("log", lambda *_: None)
    return RewardTrainer(_model(model_seed, task), TOKENIZER, pairs, config, **kwargs)


def _parameters(trainer: RewardTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.module.named_parameters()}


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "train/tokens_per_second"} for r in records]


# ---- MetaRM: the update on a model with analytic gradients ----------------------------------

def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class _LinearProblem:
    """r(x) = w . x; a meta set of P prompts with k samples each; a preference batch. The
    objective, the loss and their gradients in closed form (float64 numpy)."""

    def __init__(self, seed=0, dim=5, prompts=3, k=4, pairs=6):
        rng = np.random.default_rng(seed)
        self.theta = rng.normal(size=dim)
        self.meta = rng.normal(size=(prompts, k, dim))
        self.chosen = rng.normal(size=(pairs, dim))
        self.rejected = rng.normal(size=(pairs, dim))

    def objective(self, w):
        # J = mean over prompts of (2 / k^2) sum_{i<j} sigmoid(|r_i - r_j|)
        prompts, k, _ = self.meta.shape
        total = 0.0
        for p in range(prompts):
            r = self.meta[p] @ w
            total += sum(_sigmoid(abs(r[i] - r[j])) for i in range(k) for j in range(i + 1, k))
        return total * 2.0 / k**2 / prompts

    def objective_gradient(self, w):
        # d/dw sigmoid(|d|) = sigmoid'(|d|) sign(d) (x_i - x_j), sigmoid' = s (1 - s)
        prompts, k, dim = self.meta.shape
        gradient = np.zeros(dim)
        for p in range(prompts):
            x = self.meta[p]
            r = x @ w
            for i in range(k):
                for j in range(i + 1, k):
                    d = r[i] - r[j]
                    s = _sigmoid(abs(d))
                    gradient += s * (1 - s) * np.sign(d) * (x[i] - x[j])
        return gradient * 2.0 / k**2 / prompts

    def loss(self, w):
        delta = (self.chosen - self.rejected) @ w
        return float(np.mean(np.log1p(np.exp(-delta))))

    def loss_gradient(self, w):
        # L = mean softplus(-delta), dL/dw = -mean sigmoid(-delta) (x_c - x_r)
        difference = self.chosen - self.rejected
        return -(_sigmoid(-(difference @ w))[:, None] * difference).mean(0)

    def torch_model(self, dtype=torch.float64):
        model = torch.nn.Linear(len(self.theta), 1, bias=False).to(dtype)
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(self.theta).unsqueeze(0))
        return model

    def closures(self, model):
        dtype = model.weight.dtype
        meta = torch.from_numpy(self.meta).to(dtype)
        chosen = torch.from_numpy(self.chosen).to(dtype)
        rejected = torch.from_numpy(self.rejected).to(dtype)

        def objective():
            return metarm_difference_objective(model(meta).squeeze(-1))  # [P, k]

        def loss():
            return ops.bt_loss(model(chosen).squeeze(-1), model(rejected).squeeze(-1)).mean()

        return objective, loss


def test_metarm_step_is_ascent_then_descent():
    problem = _LinearProblem()
    eta, alpha = 0.7, 0.3
    theta = problem.theta
    lifted = theta + eta * problem.objective_gradient(theta)
    expected = theta - alpha * problem.loss_gradient(lifted)

    model = problem.torch_model()
    objective, loss = problem.closures(model)
    # the closed forms are the functions the closures compute
    assert objective().item() == pytest.approx(problem.objective(theta), rel=1e-12)
    assert loss().item() == pytest.approx(problem.loss(theta), rel=1e-12)
    optimizer = torch.optim.SGD(model.parameters(), lr=alpha)
    value, lifted_loss = metarm_step(list(model.parameters()), objective, loss, optimizer,
                                     eta=eta)
    assert value == pytest.approx(problem.objective(theta), rel=1e-12)
    assert lifted_loss == pytest.approx(problem.loss(lifted), rel=1e-12)
    np.testing.assert_allclose(model.weight.detach().numpy()[0], expected, rtol=1e-12,
                               atol=1e-14)
    # MetaRM's step is not plain descent, nor descent at theta', nor theta' after descent
    assert np.abs(expected - (theta - alpha * problem.loss_gradient(theta))).max() > 1e-3
    assert np.abs(expected - (lifted - alpha * problem.loss_gradient(lifted))).max() > 1e-3
    # eta = 0 is exactly plain SGD
    model = problem.torch_model()
    objective, loss = problem.closures(model)
    metarm_step(list(model.parameters()), objective, loss,
                torch.optim.SGD(model.parameters(), lr=alpha), eta=0.0)
    np.testing.assert_allclose(model.weight.detach().numpy()[0],
                               theta - alpha * problem.loss_gradient(theta), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_meta_ascent_restores_theta_bitwise_and_keeps_the_lifted_gradient(dtype):
    problem = _LinearProblem(seed=1, dim=64)
    eta = 25.0   # eta * grad J comparable to theta: undoing the step by subtraction is inexact
    model = problem.torch_model(dtype)
    unused = torch.nn.Parameter(torch.ones(3, dtype=dtype))   # not in J: lifted by 0
    frozen = torch.nn.Parameter(torch.ones(2, dtype=dtype), requires_grad=False)
    theta = model.weight.detach().clone()
    objective, loss = problem.closures(model)
    lifted = problem.theta + eta * problem.objective_gradient(problem.theta)
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else \
        dict(rtol=1e-5, atol=1e-6)
    with MetaAscent([model.weight, unused, frozen], objective, eta) as ascent:
        assert ascent.value == pytest.approx(problem.objective(problem.theta), rel=1e-6)
        np.testing.assert_allclose(model.weight.detach().double().numpy()[0], lifted,
                                   **tolerance)
        assert torch.equal(unused.detach(), torch.ones(3, dtype=dtype))
        loss().backward()
    # theta itself, bit for bit; theta' - eta * g would not round back to it here
    step = torch.from_numpy(problem.objective_gradient(problem.theta)).to(dtype).unsqueeze(0)
    assert not torch.equal(theta.clone().add_(step, alpha=eta).sub_(step, alpha=eta), theta)
    assert torch.equal(model.weight.detach(), theta)
    assert torch.equal(frozen.detach(), torch.ones(2, dtype=dtype))
    # the gradient left for the optimizer is the loss's gradient at theta'
    np.testing.assert_allclose(model.weight.grad.double().numpy()[0],
                               problem.loss_gradient(lifted), **tolerance)
    assert unused.grad is None


def test_meta_ascent_restores_theta_when_the_block_fails():
    problem = _LinearProblem(seed=2)
    model = problem.torch_model()
    theta = model.weight.detach().clone()
    objective, _ = problem.closures(model)
    with pytest.raises(RuntimeError, match="boom"):
        with MetaAscent(list(model.parameters()), objective, 1.0):
            assert not torch.equal(model.weight.detach(), theta)
            raise RuntimeError("boom")
    assert torch.equal(model.weight.detach(), theta)


def test_metarm_difference_objective_value():
    # the acceptance value
    value = metarm_difference_objective(torch.tensor([0.5, 1.5, -0.2, 0.9], dtype=torch.float64))
    assert float(value) == pytest.approx(0.5299, abs=5e-5)


# ---- MetaRM in the trainer --------------------------------------------------------------------

def test_trainer_metarm_uses_the_lifted_gradient_and_logs_j():
    eta = 5.0
    config = _config(steps=1, metarm_eta=eta, metarm_batch=4, max_grad_norm=None)
    trainer = _trainer(config, meta_set=META)
    theta = _parameters(trainer)
    params = list(trainer.module.parameters())

    # J(theta) on step 0's meta batch, its gradient, and the BT gradient at theta + eta grad J,
    # computed on a second trainer whose parameters are lifted by hand
    objective = trainer._meta_objective(0)()
    ascent = torch.autograd.grad(objective, params, allow_unused=True)
    reference = _trainer(_config(steps=1, max_grad_norm=None))
    with torch.no_grad():
        for p, g in zip(reference.module.parameters(), ascent):
            if g is not None:
                p.add_(g, alpha=eta)
    reference.module.train()
    torch.manual_seed(step_seed(0, 0, 0))
    loss, _ = reference._micro_loss(reference._micro_batches(0)[0])
    expected = torch.autograd.grad(loss, list(reference.module.parameters()), allow_unused=True)

    seen = {}

    def before_step(*_):
        seen["params"] = _parameters(trainer)
        seen["grads"] = [None if p.grad is None else p.grad.clone() for p in params]

    trainer.optimizer.register_step_pre_hook(before_step)
    result = trainer.train()
    # the optimizer applies grad L(theta') to theta itself
    for name, value in seen["params"].items():
        assert torch.equal(value, theta[name]), name
    for got, want in zip(seen["grads"], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert result.history[0]["train/metarm_objective"] == pytest.approx(objective.item(),
                                                                        rel=1e-6)
    # k = 4: J lies in [(k-1)/(2k), (k-1)/k)
    assert 3 / 8 <= result.history[0]["train/metarm_objective"] < 3 / 4


def test_trainer_metarm_changes_the_update():
    final = {}
    for eta in (0.0, 5.0):
        config = _config(steps=2, metarm_eta=eta, metarm_batch=3)
        trainer = _trainer(config, meta_set=META)
        result = trainer.train()
        final[eta] = _parameters(trainer)
        logged = ["train/metarm_objective" in r for r in result.history]
        assert all(logged) if eta else not any(logged)
    difference = max(float((final[0.0][k] - final[5.0][k]).abs().max()) for k in final[0.0])
    assert difference > 1e-4


def test_trainer_metarm_accepts_ranked_examples_and_checks_k():
    ranked = TASK.ranked_examples(3, k=3, seed=5)
    trainer = _trainer(_config(steps=1, metarm_eta=0.1, metarm_batch=2), meta_set=ranked)
    assert len(trainer.meta_data) == 3
    with pytest.raises(ValueError, match=r"meta_set\[1\]: MetaRM needs k >= 2 responses"):
        _trainer(_config(metarm_eta=0.1), meta_set=[META[0], (META[1][0], META[1][1][:1])])
    with pytest.raises(ValueError, match="metarm_eta > 0 needs a meta_set"):
        _trainer(_config(metarm_eta=0.1))


# ---- prepare_pairs ----------------------------------------------------------------------------

MU = [0.5, -1.2, 2.0, -0.3, 0.0, 1.1, -2.5, 0.7, 3.0, -0.1]


def _strength_pairs(mu=MU, key="strength_mu"):
    pairs = TASK.preference_pairs(len(mu), seed=9)
    return [dataclasses.replace(p, margin=None if i % 3 == 0 else 0.1 * i,
                                extra={**p.extra, key: m})
            for i, (p, m) in enumerate(zip(pairs, mu))]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.35, 0.5])
def test_flip_lowest_flips_exactly_the_lowest(fraction):
    generator = torch.Generator().manual_seed(3)
    mu = torch.randn(20, generator=generator, dtype=torch.float64).tolist()
    pairs = _strength_pairs(mu)
    prepared = prepare_pairs(pairs, RewardTrainerConfig(flip_lowest=fraction))
    count = round(fraction * len(mu))
    lowest = set(np.argsort(mu, kind="stable")[:count].tolist())
    assert int(prepared.flipped.sum()) == count
    assert set(prepared.flipped.nonzero().flatten().tolist()) == lowest
    assert prepared.origin == list(range(20))
    for i, (before, after) in enumerate(zip(pairs, prepared.pairs)):
        if i in lowest:
            assert (after.chosen, after.rejected) == (before.rejected, before.chosen)
            assert after.extra["flipped_by_strength"] is True
            assert prepared.strength[i] == -mu[i]
            assert after.margin == (None if before.margin is None else -before.margin)
        else:
            assert after is before
            assert prepared.strength[i] == mu[i]
    assert prepared.summary()["flipped"] == count


def test_drop_lowest_after_flipping():
    pairs = _strength_pairs()
    prepared = prepare_pairs(pairs, RewardTrainerConfig(flip_lowest=0.2, drop_lowest=0.2))
    # flipped: -2.5 (6) and -1.2 (1); then the lowest of the new strengths: -0.3 (3), -0.1 (9)
    assert prepared.origin == [0, 1, 2, 4, 5, 6, 7, 8]
    assert prepared.strength.tolist() == [0.5, 1.2, 2.0, 0.0, 1.1, 2.5, 0.7, 3.0]
    assert prepared.flipped.tolist() == [False, True, False, False, False, True, False, False]
    assert [p.chosen for p in prepared.pairs] == \
        [pairs[0].chosen, pairs[1].rejected, pairs[2].chosen, pairs[4].chosen, pairs[5].chosen,
         pairs[6].rejected, pairs[7].chosen, pairs[8].chosen]
    only_drop = prepare_pairs(pairs, RewardTrainerConfig(drop_lowest=0.3))
    assert only_drop.origin == [0, 2, 4, 5, 7, 8, 9]   # -2.5, -1.2, -0.3 dropped
    assert not only_drop.flipped.any()


def test_margins():
    pairs = _strength_pairs()
    assert prepare_pairs(pairs, RewardTrainerConfig()).margin is None
    column = prepare_pairs(pairs, RewardTrainerConfig(margin="column", margin_scale=2.0))
    expected = [0.0 if p.margin is None else 2.0 * p.margin for p in pairs]
    torch.testing.assert_close(column.margin, torch.tensor(expected, dtype=torch.float32))
    assert column.strength is None  # the column needs no strength
    strength = prepare_pairs(pairs, RewardTrainerConfig(margin="strength", margin_scale=0.5))
    torch.testing.assert_close(strength.margin,
                               torch.tensor([0.5 * m for m in MU], dtype=torch.float32))
    flipped = prepare_pairs(pairs, RewardTrainerConfig(margin="strength", flip_lowest=0.1))
    assert float(flipped.margin[6]) == 2.5  # the flipped pair's margin is -mu


def test_smoothing_all_or_negative_strength():
    pairs = _strength_pairs()
    off = prepare_pairs(pairs, RewardTrainerConfig())
    assert off.smoothing.tolist() == [0.0] * 10
    every = prepare_pairs(pairs, RewardTrainerConfig(label_smoothing=0.2))
    torch.testing.assert_close(every.smoothing, torch.full((10,), 0.2))
    negative = prepare_pairs(pairs, RewardTrainerConfig(label_smoothing=0.2,
                                                        smoothing_on="negative_strength"))
    torch.testing.assert_close(negative.smoothing,
                               torch.tensor([0.2 if m < 0 else 0.0 for m in MU]))
    # after a flip the flipped pairs' strength is positive: no smoothing for them
    both = prepare_pairs(pairs, RewardTrainerConfig(label_smoothing=0.2, flip_lowest=0.2,
                                                    smoothing_on="negative_strength"))
    assert both.smoothing.nonzero().flatten().tolist() == [3, 9]
    assert both.summary()["smoothed"] == 2


def test_missing_strength_names_the_pair_and_the_option():
    pairs = _strength_pairs()
    pairs[4] = dataclasses.replace(pairs[4], extra={"other": 1.0})
    with pytest.raises(ValueError) as error:
        prepare_pairs(pairs, RewardTrainerConfig(flip_lowest=0.1))
    message = str(error.value)
    assert str(pairs[4].source) in message            # synthetic:pairs/seed=9:4
    assert "'strength_mu'" in message and "flip_lowest=0.1" in message
    with pytest.raises(ValueError, match="margin=strength"):
        prepare_pairs(pairs, RewardTrainerConfig(margin="strength"))
    with pytest.raises(ValueError, match="smoothing_on=negative_strength"):
        prepare_pairs(pairs, RewardTrainerConfig(label_smoothing=0.1,
                                                 smoothing_on="negative_strength"))
    # no source: the pair's position
    pairs[4] = dataclasses.replace(pairs[4], source=None, extra={"strength_mu": float("nan")})
    with pytest.raises(ValueError, match=r"pair 4: no finite preference strength .* \(got nan\)"):
        prepare_pairs(pairs, RewardTrainerConfig(drop_lowest=0.1))
    pairs[4] = dataclasses.replace(pairs[4], extra={"strength_mu": True})
    with pytest.raises(ValueError, match="got True"):
        prepare_pairs(pairs, RewardTrainerConfig(drop_lowest=0.1))
    # a custom column, and options that need no strength at all
    custom = _strength_pairs(key="mu")
    assert prepare_pairs(custom, RewardTrainerConfig(flip_lowest=0.1,
                                                     strength_key="mu")).flipped.sum() == 1
    prepare_pairs(pairs, RewardTrainerConfig(margin="column", label_smoothing=0.1))


# ---- the optimized loss against a hand-built reference ----------------------------------------

def _reference_loss(module, trainer, indices):
    """The loss of METHODS.md section 1 for the pairs ``indices`` of the training set, from the
    model's raw outputs (score mode last)."""
    cfg = trainer.config
    data = trainer.train_data
    batch = data.collate([data[i] for i in indices])
    n = len(indices)
    views = 2 if cfg.contrastive != "none" else 1
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]] * views)
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]] * views)
    last = torch.cat([batch["chosen_last_index"], batch["rejected_last_index"]] * views)
    out = module.reward_model(ids, mask)
    rows = torch.arange(len(ids))
    rewards = out.values[rows, last].double()
    chosen, rejected = rewards[:n], rewards[n:2 * n]
    pairs = [TRAIN[i] for i in indices]   # no flips or drops here: the input pairs themselves
    mu = torch.tensor([p.extra["strength_mu"] for p in pairs], dtype=torch.float64)
    if cfg.margin == "column":
        margin = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float64)
    elif cfg.margin == "strength":
        margin = mu
    else:
        margin = torch.zeros(n, dtype=torch.float64)
    margin = margin * cfg.margin_scale
    if cfg.smoothing_on == "all":
        alpha = torch.full((n,), cfg.label_smoothing, dtype=torch.float64)
    else:
        alpha = torch.where(mu < 0, cfg.label_smoothing, 0.0)
    delta = chosen - rejected - margin
    bt = ((1 - alpha) * F.softplus(-delta) + alpha * F.softplus(delta)).mean()
    parts = {"bt_loss": bt}
    loss = bt
    if cfg.center_rewards:
        parts["center_loss"] = ((chosen + rejected) ** 2).mean()
        loss = loss + cfg.center_rewards * parts["center_loss"]
    if cfg.contrastive != "none":
        h = out.hidden_states[rows, last].float()
        view0_chosen, view0_rejected, view1_chosen, view1_rejected = h.split(n)
        if cfg.contrastive_on == "single":
            a = torch.cat([view0_chosen, view0_rejected])
            b = torch.cat([view1_chosen, view1_rejected])
        else:
            a = torch.cat([view0_chosen - view0_rejected, view0_rejected - view0_chosen])
            b = torch.cat([view1_chosen - view1_rejected, view1_rejected - view1_chosen])
        if cfg.contrastive == "simcse":
            contrastive = simcse_loss(a, b, temperature=cfg.contrastive_tau)
        else:
            contrastive = swav_loss(a, b, module.prototypes, temperature=cfg.swav_temperature,
                                    epsilon=cfg.swav_epsilon, iterations=cfg.swav_iterations)
        parts["contrastive_loss"] = contrastive
        loss = loss + cfg.contrastive_beta * contrastive
    return loss, parts


LOSS_CASES = {
    "plain": dict(),
    "margin column, smoothing all": dict(margin="column", margin_scale=1.5,
                                         label_smoothing=0.2),
    "strength margin, negative smoothing, centering": dict(
        margin="strength", label_smoothing=0.3, smoothing_on="negative_strength",
        center_rewards=0.25),
    "simcse single": dict(contrastive="simcse", contrastive_on="single", contrastive_beta=0.5),
    "simcse difference": dict(contrastive="simcse", contrastive_on="difference",
                              contrastive_beta=0.5, contrastive_tau=0.1),
    "swav single": dict(contrastive="swav", contrastive_on="single", contrastive_beta=0.7,
                        swav_prototypes=6),
    "swav difference": dict(contrastive="swav", contrastive_on="difference",
                            contrastive_beta=0.7, swav_prototypes=6, swav_iterations=2),
}


@pytest.mark.parametrize("case", LOSS_CASES)
def test_optimized_loss_matches_reference(case):
    config = _config(steps=1, **LOSS_CASES[case])
    trainer = _trainer(config, task=DROPOUT_TASK)
    initial = copy.deepcopy(trainer.module)
    calls = []
    micro_loss = trainer._micro_loss

    def spy(indices):
        loss, parts = micro_loss(indices)
        calls.append((list(indices), loss.detach(), parts))
        return loss, parts

    trainer._micro_loss = spy
    result = trainer.train()
    (indices, loss, parts), = calls
    assert indices == trainer._step_indices(0)
    # the step's dropout stream, replayed on the initial parameters
    initial.train()
    torch.manual_seed(step_seed(config.seed, 0, 0))
    with torch.no_grad():
        expected, expected_parts = _reference_loss(initial, trainer, indices)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    for key, value in expected_parts.items():
        assert float(parts[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
        assert result.history[0][f"train/{key}"] == pytest.approx(float(value), rel=1e-5,
                                                                  abs=1e-6)
    assert result.history[0]["train/loss"] == pytest.approx(float(expected), rel=1e-5,
                                                            abs=1e-6)
    if config.contrastive != "none":
        # the two dropout views differ: the contrastive loss sees real positives
        assert float(parts["contrastive_loss"]) > 0


def test_swav_prototypes_are_trained_and_checkpointed(tmp_path):
    config = _config(steps=2, contrastive="swav", swav_prototypes=5, output_dir=str(tmp_path),
                     save_model=False)
    trainer = _trainer(config, task=DROPOUT_TASK)
    prototypes = trainer.module.prototypes
    assert prototypes.shape == (5, trainer.model.value_head.in_features)
    before = prototypes.detach().clone()
    assert any(p is prototypes for group in trainer.optimizer.param_groups
               for p in group["params"])
    trainer.train()
    assert prototypes.grad is not None and float(prototypes.grad.abs().sum()) > 0
    assert not torch.equal(prototypes.detach(), before)
    state = CheckpointManager.load(CheckpointManager(tmp_path).latest())
    assert torch.equal(state["module"]["prototypes"], prototypes.detach())
    # they are the seed's: another trainer with the same seed starts from the same ones
    assert torch.equal(_trainer(config, task=DROPOUT_TASK).module.prototypes.detach(), before)
    assert _trainer(_config(), task=DROPOUT_TASK).module.prototypes is None


def test_simcse_without_dropout_warns():
    messages = []
    _trainer(_config(contrastive="simcse"), log=messages.append)
    assert any("no dropout" in m for m in messages)
    messages.clear()
    _trainer(_config(contrastive="simcse"), task=DROPOUT_TASK, log=messages.append)
    assert not any("no dropout" in m for m in messages)


# ---- score modes ------------------------------------------------------------------------------

def _pair_batch(trainer, indices=range(6)):
    batch = trainer._batch(trainer.train_data, list(indices))
    return trainer._pair_rows(batch)


def test_token_mean_score_excludes_eos():
    trainer = _trainer(_config(score_mode="token_mean"))
    ids, mask, response, last = _pair_batch(trainer)
    assert bool((ids[torch.arange(len(ids)), last] == EOS).all())  # every row ends in EOS
    assert bool(response[torch.arange(len(ids)), last].all())      # and EOS is in the response
    values = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0))
    scores = trainer._scores(values, ids, mask, response, last)
    for row in range(len(ids)):
        content = [t for t in range(ids.shape[1]) if response[row, t] and ids[row, t] != EOS]
        assert content and max(content) == int(last[row]) - 1
        assert float(scores[row]) == pytest.approx(float(values[row, content].mean()), rel=1e-5,
                                                   abs=1e-6)


def _entropies_by_hand(model, ids, mask):
    """[B, T] float64: at t, the entropy of the model's distribution at position t, which
    predicts token t + 1 (METHODS.md section 3)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    log_p = torch.log_softmax(logits, -1)
    return -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("kernels", ["engine", "reference"])
def test_segment_score_uses_the_entropy_models_boundaries(kernels):
    entropy_model = TASK.make_policy(seed=3)
    probe = _trainer(_config())
    ids, mask, response, last = _pair_batch(probe, range(8))
    entropy = _entropies_by_hand(entropy_model, ids, mask)
    content = response & (ids != EOS)
    # a threshold in the middle of a wide gap between the content positions' entropies
    values = torch.sort(entropy[content]).values
    gaps = values[1:] - values[:-1]
    middle = len(values) // 2
    gap = middle - 5 + int(torch.argmax(gaps[middle - 5:middle + 5]))
    threshold = float(values[gap] + values[gap + 1]) / 2
    assert float(gaps[gap]) > 1e-5

    trainer = _trainer(_config(score_mode="segment", segment_threshold=threshold),
                       entropy_model=entropy_model, kernels=kernels)
    per_token = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    scores = trainer._scores(per_token, ids, mask, response, last)
    segments = []
    for row in range(len(ids)):
        positions = content[row].nonzero().flatten().tolist()
        ends = [t for t in positions if entropy[row, t] > threshold]
        if positions[-1] not in ends:
            ends.append(positions[-1])              # the last content token ends the last one
        segments.append(len(ends))
        assert float(scores[row]) == pytest.approx(float(per_token[row, ends].mean()), rel=1e-5)
    # the threshold really splits responses (several segments, not one or one per token)
    assert max(segments) > 1
    assert sum(segments) < int(content.sum())

    # the other alignment (the entropy of the distribution that produced token t) gives other
    # boundaries, so the check above can tell them apart
    shifted = F.pad(entropy[:, :-1], (1, 0))
    assert bool(((shifted > threshold) != (entropy > threshold))[content].any())


def test_segment_mode_kernels_agree():
    entropy_model = TASK.make_policy(seed=3)
    # this random-init model's entropies lie around 3.38-3.40 (log 30 = 3.40): the threshold
    # splits responses into several segments
    options = dict(score_mode="segment", segment_threshold=3.386, margin="strength",
                   label_smoothing=0.1, center_rewards=0.1, steps=3)
    runs = {}
    for kernels in ("engine", "reference"):
        trainer = _trainer(_config(**options), entropy_model=entropy_model, kernels=kernels)
        ids, mask, response, last = _pair_batch(trainer)
        _, counts = trainer.ops.entropy_segments(
            trainer._entropy(ids, mask), trainer._content_mask(ids, response, last),
            threshold=options["segment_threshold"])
        assert 1 < float(counts.float().mean()) < float((response.sum(-1) - 1).float().mean())
        runs[kernels] = (trainer.train(), _parameters(trainer))
    (engine, engine_params), (reference, reference_params) = runs.values()
    for a, b in zip(engine.history, reference.history):
        for key in ("train/loss", "train/bt_loss", "train/center_loss", "train/reward_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for name in engine_params:
        torch.testing.assert_close(engine_params[name], reference_params[name], atol=5e-5,
                                   rtol=1e-4)
    # the entropy model is used under no_grad, and its flags stay the caller's: it is often the
    # SFT policy that later reward models are deep-copied from, which must stay trainable
    assert all(p.requires_grad for p in entropy_model.parameters())
    assert entropy_model.training


def test_engine_and_reference_kernels_give_the_same_loss():
    losses = {}
    for kernels in ("engine", "reference"):
        trainer = _trainer(_config(margin="column", label_smoothing=0.2), kernels=kernels)
        trainer.module.train()
        loss, _ = trainer._micro_loss(trainer._step_indices(0))
        losses[kernels] = loss.item()
    assert losses["engine"] == pytest.approx(losses["reference"], rel=1e-6)
    with pytest.raises(ValueError, match="kernels must be 'engine' or 'reference'"):
        _trainer(_config(), kernels="triton")


# ---- accumulation and data order --------------------------------------------------------------

def test_grad_accum_matches_one_big_batch():
    runs, gradients = {}, {}
    for accum in (1, 2, 4):
        trainer = _trainer(_config(steps=4, grad_accum=accum, center_rewards=0.1,
                                   max_grad_norm=None))
        if accum > 1:
            micro = trainer._micro_batches(1)
            assert len(micro) == accum and all(len(m) == 8 // accum for m in micro)
            assert sum(micro, []) == trainer._step_indices(1)
        # the gradients themselves (AdamW and clipping would hide a scale error in them, so
        # no clipping here)
        gradients[accum] = []
        trainer.optimizer.register_step_pre_hook(
            lambda *_, trainer=trainer, accum=accum: gradients[accum].append(
                [p.grad.clone() for p in trainer.module.parameters()]))
        runs[accum] = (trainer.train(), _parameters(trainer))
    base_result, base = runs[1]
    for accum in (2, 4):
        for got, want in zip(gradients[accum][0], gradients[1][0]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        result, params = runs[accum]
        for name in base:
            # AdamW divides by sqrt(v): a weight with a tiny gradient turns fp32 rounding of
            # the sums into a visible (but still tiny next to lr = 2e-3) difference
            torch.testing.assert_close(params[name], base[name], atol=2e-5, rtol=1e-4)
        for a, b in zip(base_result.history, result.history):
            assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
            assert a["train/accuracy"] == b["train/accuracy"]


def test_batch_order_depends_only_on_the_seed():
    a = _trainer(_config(seed=5))
    b = _trainer(_config(seed=5, grad_accum=2, lr=1e-3), model_seed=7)
    c = _trainer(_config(seed=6))
    steps_per_epoch = len(TRAIN) // 8
    assert a.steps_per_epoch == steps_per_epoch
    order_a = [a._step_indices(s) for s in range(3 * steps_per_epoch)]
    assert order_a == [b._step_indices(s) for s in range(3 * steps_per_epoch)]
    assert order_a != [c._step_indices(s) for s in range(3 * steps_per_epoch)]
    for epoch in range(3):
        seen = sum(order_a[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch], [])
        assert sorted(seen) == list(range(len(TRAIN)))   # each epoch a permutation
    assert order_a[:steps_per_epoch] != order_a[steps_per_epoch:2 * steps_per_epoch]


def test_steps_from_epochs():
    assert _trainer(_config(steps=None, epochs=1.5)).total_steps == 12
    assert _trainer(_config(steps=None, epochs=0.01)).total_steps == 1


# ---- schedules and logging --------------------------------------------------------------------

@pytest.mark.parametrize("schedule, warmup", [("inverse_sqrt", 2), ("cosine", 2),
                                              ("linear", 0), ("constant", 3)])
def test_learning_rate_follows_the_schedule_and_is_logged(schedule, warmup):
    config = _config(steps=6, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.1)
    result = _trainer(config).train()
    logged = [r["train/lr"] for r in result.history]
    expected = [config.lr * lr_multiplier(s, schedule=schedule, warmup_steps=warmup,
                                          total_steps=6, min_ratio=0.1) for s in range(6)]
    assert logged == pytest.approx(expected)
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]


def test_training_records():
    result = _trainer(_config(steps=5, log_every=2)).train()
    assert [r["step"] for r in result.history] == [2, 4, 5]   # every 2 and the last
    record = result.history[0]
    for key in ("train/loss", "train/bt_loss", "train/accuracy", "train/reward_mean",
                "train/lr", "train/grad_norm", "train/tokens_per_second", "train/epoch"):
        assert math.isfinite(record[key]), key
    assert 0 <= record["train/accuracy"] <= 1
    assert record["train/epoch"] == 2 / 8
    assert result.steps == 5 and result.metrics == {} and result.model_dir is None


# ---- evaluation -------------------------------------------------------------------------------

def test_pair_metrics_ties_count_half():
    chosen = torch.tensor([1.0, 2.0, 0.5, -1.0])
    rejected = torch.tensor([0.0, 2.0, 1.5, -1.0])
    metrics = pair_metrics(chosen, rejected)
    assert metrics["accuracy"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    d = np.array([1.0, 0.0, -1.0, 0.0])
    assert metrics["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-d))))
    both = np.array([1.0, 2.0, 0.5, -1.0, 0.0, 2.0, 1.5, -1.0])
    assert metrics["reward_mean"] == pytest.approx(both.mean())
    assert metrics["reward_std"] == pytest.approx(both.std())
    assert metrics["pairs"] == 4


def test_evaluation_on_several_sets_matches_recomputation():
    config = _config(steps=4, eval_every=2, eval_batch_size=5)
    trainer = _trainer(config, eval_sets={"clean": EVAL_A, "noisy": EVAL_B})
    result = trainer.train()
    evals = [r for r in result.history if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    assert set(result.metrics) == {"clean", "noisy"}
    model = trainer.model.eval()
    for name, pairs in (("clean", EVAL_A), ("noisy", EVAL_B)):
        chosen, rejected = [], []
        for pair in pairs:
            for text, out in ((pair.chosen, chosen), (pair.rejected, rejected)):
                ids = torch.tensor([TASK.encode(pair.prompt, text)])
                with torch.no_grad():
                    out.append(float(model(ids).values[0, -1]))
        chosen, rejected = np.array(chosen), np.array(rejected)
        d = chosen - rejected
        both = np.concatenate([chosen, rejected])
        metrics = result.metrics[name]
        assert metrics["pairs"] == len(pairs)
        assert metrics["accuracy"] == pytest.approx(np.mean((d > 0) + 0.5 * (d == 0)))
        assert metrics["loss"] == pytest.approx(np.mean(np.logaddexp(0, -d)), rel=1e-5)
        assert metrics["reward_mean"] == pytest.approx(both.mean(), rel=1e-5, abs=1e-6)
        assert metrics["reward_std"] == pytest.approx(both.std(), rel=1e-5)
        for key, value in metrics.items():
            assert evals[-1][f"eval/{name}/{key}"] == value
    # score_pairs scores any pairs the same way
    chosen, rejected = trainer.score_pairs(EVAL_B)
    assert pair_metrics(chosen, rejected) == result.metrics["noisy"]


# ---- checkpoints and resume -------------------------------------------------------------------

RUN = dict(steps=8, eval_every=2, log_every=1, keep_checkpoints=0)


def _run(directory, *, model_seed=0, pairs=TRAIN, **overrides):
    config = _config(**{**RUN, "output_dir": str(directory), **overrides})
    trainer = _trainer(config, pairs, model_seed=model_seed, eval_sets={"clean": EVAL_A})
    return trainer, trainer.train()


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    full, full_result = _run(tmp_path / "a")
    final = _parameters(full)
    assert CheckpointManager(tmp_path / "a").steps() == [8]        # save_every 0: the end only
    assert (tmp_path / "a" / "config.yaml").is_file()
    assert _without_timing(read_metrics(tmp_path / "a")) == _without_timing(full_result.history)

    run = tmp_path / "b"
    _, saved_result = _run(run, save_every=3)
    checkpoints = CheckpointManager(run)
    assert checkpoints.steps() == [3, 6, 8]
    # a crash during step 8: no final checkpoint or model, metrics up to step 7 and a cut line
    shutil.rmtree(checkpoints.path(8))
    shutil.rmtree(run / "model")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if '"step": 8' not in line]
    assert len(kept) < len(lines)
    (run / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 8, "train/lo')

    messages = []
    config = _config(**{**RUN, "output_dir": str(run), "save_every": 3})
    resumed = _trainer(config, model_seed=99, eval_sets={"clean": EVAL_A}, log=messages.append)
    result = resumed.train()
    assert result.resumed_from == 6 and result.steps == 8
    assert any("resumed from" in m and "step 6 of 8" in m for m in messages)
    for name, value in _parameters(resumed).items():
        assert torch.equal(value, final[name]), name
    assert result.metrics == full_result.metrics
    assert _without_timing(result.history) == _without_timing(full_result.history)
    assert _without_timing(read_metrics(run)) == _without_timing(read_metrics(tmp_path / "a"))
    assert (run / "model").is_dir()
    assert CheckpointManager(run).steps() == [3, 6, 8]

    # a finished run resumes to nothing left to do, with its final evaluation
    again = _trainer(config, model_seed=99, eval_sets={"clean": EVAL_A})
    done = again.train()
    assert (done.resumed_from, done.steps) == (8, 8)
    assert done.metrics == full_result.metrics
    assert _without_timing(read_metrics(run)) == _without_timing(read_metrics(tmp_path / "a"))

    # the model written at the end scores as the trained one
    loaded = RewardModel.load(run / "model")
    ids = torch.tensor([TASK.encode(EVAL_A[0].prompt, EVAL_A[0].chosen)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).values, full.model.eval()(ids).values)


def test_resume_refuses_changed_options(tmp_path):
    _run(tmp_path, steps=3)
    config = _config(**{**RUN, "steps": 3, "output_dir": str(tmp_path), "lr": 1e-3})
    with pytest.raises(ValueError, match=r"cannot resume from .*step-00000003: the run's options "
                                         r"changed \(lr: 0.002 -> 0.001\); use another "
                                         r"output_dir, or resume=false"):
        _trainer(config, eval_sets={"clean": EVAL_A}).train()
    with pytest.raises(ValueError, match=r"swav_temperature: 0.1 -> 0.2"):
        _run(tmp_path, steps=3, swav_temperature=0.2)
    with pytest.raises(ValueError, match=r"training pairs: 64 -> 56"):
        _run(tmp_path, steps=3, pairs=TRAIN[:56])
    # cadence options may change
    _, result = _run(tmp_path, steps=3, eval_every=1, log_every=3)
    assert result.resumed_from == 3


def test_resume_false_starts_over(tmp_path):
    reference, _ = _run(tmp_path / "a", steps=4)
    _run(tmp_path / "b", steps=4, save_every=2)
    stale = CheckpointManager(tmp_path / "b")
    stale.save(100, {"not": "a checkpoint of this run"})
    trainer, result = _run(tmp_path / "b", steps=4, save_every=2, resume=False,
                           model_seed=0)
    assert result.resumed_from is None
    assert CheckpointManager(tmp_path / "b").steps() == [2, 4]   # the old ones were deleted
    expected = _parameters(reference)
    for name, value in _parameters(trainer).items():
        assert torch.equal(value, expected[name]), name
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == \
        [r["step"] for r in read_metrics(tmp_path / "a")]


def test_checkpoints_pruned_to_keep_last(tmp_path):
    _run(tmp_path, steps=7, save_every=2, keep_checkpoints=2, eval_every=0)
    assert CheckpointManager(tmp_path).steps() == [6, 7]
    state = CheckpointManager.load(CheckpointManager(tmp_path).latest())
    assert state["step"] == 7 and state["train_pairs"] == len(TRAIN)
    assert [r["step"] for r in state["history"]][-1] == 7


def test_tensorboard_events_from_the_trainer(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, steps=2, tensorboard=True, save_model=False)
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/clean/accuracy"} <= set(tags)
    assert [s.step for s in accumulator.Scalars("train/loss")] == [1, 2]
    assert [s.value for s in accumulator.Scalars("train/loss")] == pytest.approx(
        [r["train/loss"] for r in read_metrics(tmp_path)[:3] if "train/loss" in r])


# ---- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(grad_accum=0), "grad_accum must be >= 1"),
    (dict(swav_prototypes=0), "swav_prototypes must be >= 1"),
    (dict(lr=-1.0), "lr must be >= 0, got -1.0"),
    (dict(lr=float("nan")), "lr must be >= 0, got nan"),
    (dict(warmup_steps=-2), "warmup_steps must be >= 0"),
    (dict(metarm_eta=-0.1), "metarm_eta must be >= 0"),
    (dict(steps=0), "steps must be >= 1 or none, got 0"),
    (dict(epochs=0.0), "epochs must be > 0"),
    (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\], got 1.5"),
    (dict(flip_lowest=1.0), r"flip_lowest must be in \[0, 1\), got 1.0"),
    (dict(drop_lowest=-0.1), r"drop_lowest must be in \[0, 1\)"),
    (dict(contrastive_tau=0.0), "contrastive_tau must be > 0"),
    (dict(swav_epsilon=-1.0), "swav_epsilon must be > 0"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be > 0 or none"),
])
def test_config_validation(options, message):
    with pytest.raises(ValueError, match=message):
        RewardTrainerConfig(**options)


def test_config_help_and_invariants():
    fields = {f.name: f for f in dataclasses.fields(RewardTrainerConfig)}
    assert all(f.metadata.get("help") for f in fields.values())
    assert set(RewardTrainerConfig.RESUME_INVARIANT) <= set(fields)
    assert not RewardTrainerConfig().uses_strength
    assert RewardTrainerConfig(label_smoothing=0.1, smoothing_on="negative_strength").uses_strength
    assert not RewardTrainerConfig(smoothing_on="negative_strength").uses_strength


def test_trainer_argument_errors():
    with pytest.raises(ValueError, match=r"batch_size \(6\) must divide into grad_accum \(4\)"):
        _trainer(_config(batch_size=6, grad_accum=4))
    with pytest.raises(ValueError, match=r"batch_size \(80\) is larger than the training set "
                                         r"\(64 pairs\)"):
        _trainer(_config(batch_size=80))
    with pytest.raises(ValueError, match="score_mode='segment' needs an entropy_model"):
        _trainer(_config(score_mode="segment"))
    with pytest.raises(ValueError, match="train_pairs is empty"):
        _trainer(_config(), pairs=[])
    with pytest.raises(ValueError, match="evaluation set 'x' is empty"):
        _trainer(_config(), eval_sets={"x": []})
    with pytest.raises(TypeError, match="model must be a rlengine RewardModel, got LlamaModel"):
        RewardTrainer(TASK.make_reward_backbone(0), TOKENIZER, TRAIN, _config())
    with pytest.raises(ValueError, match="flip_lowest=0.1"):
        _trainer(_config(flip_lowest=0.1), pairs=[dataclasses.replace(p, extra={})
                                                  for p in TRAIN])
