"""rlengine.integrations.verl against veRL's own functions (the oracle), inside a virtual
environment with veRL installed (tests/test_integrations.py builds it and runs this file there).

Every case runs veRL's original and the patched function on the same inputs: same result within
the stated tolerance, same dtype, same errors; and which path ran (the engine's or the fallback
to veRL's own code) is checked where it matters."""

import importlib
import random
import sys
import warnings

import pytest
import torch

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = importlib.import_module("verl.utils.torch_functional")

from rlengine.integrations import verl as rlengine_verl  # noqa: E402
from rlengine.integrations._patching import check_version  # noqa: E402

# veRL's originals, held in a dict: apply() rebinds every module attribute that holds one
# (this module's too), never a dict's values.
ORIGINALS = {"gae": verl_core.compute_gae_advantage_return, "mean": verl_F.masked_mean,
             "var": verl_F.masked_var, "whiten": verl_F.masked_whiten}
CASES = 1000

# Tolerances: the op carries the recursion and the sums in float64, veRL in the input dtype, so
# the two differ by veRL's rounding: about T float32 ulps for the loop, and whitening divides
# by the standard deviation (relative error grows by 1/std for tiny spreads; the cases draw
# values of unit scale). bf16: veRL's loop rounds every step to 8 bits.
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4),
             torch.bfloat16: (0.1, 0.1), torch.float16: (2e-2, 2e-2)}


def _mask(rows: int, steps: int, kind: str, rng: random.Random) -> torch.Tensor:
    mask = torch.zeros(rows, steps, dtype=torch.int64)
    for row in range(rows):
        if kind == "right_padded":
            mask[row, :rng.randint(0, steps)] = 1
        elif kind == "multi_turn":  # response, tool output (masked), response, ..., padding
            t = 0
            while t < steps:
                length = rng.randint(1, max(1, steps // 3))
                mask[row, t:t + length] = int(rng.random() < 0.6)
                t += length
        elif kind == "left_and_right":
            start = rng.randint(0, steps - 1)
            mask[row, start:rng.randint(start, steps)] = 1
        elif kind == "ones":
            mask[row] = 1
        elif kind == "random":
            mask[row] = (torch.rand(steps) < 0.5).long()
    return mask


def _draw_gae_case(rng: random.Random):
    rows, steps = rng.randint(1, 6), rng.choice([1, 2, 3, rng.randint(4, 40), rng.randint(40, 130)])
    kind = rng.choice(["right_padded", "multi_turn", "left_and_right", "ones", "random"])
    mask = _mask(rows, steps, kind, rng)
    if mask.sum() < 2:  # veRL whitens: a mask summing to 0 or 1 raises (tested on its own)
        mask[0, :min(steps, 2)] = 1
        if mask.sum() < 2:
            mask = torch.ones(max(rows, 2), steps, dtype=torch.int64)
            rows = mask.shape[0]
    mask = mask.to(rng.choice([torch.int64, torch.int32, torch.float32]))
    rewards_dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    values_dtype = rng.choice([rewards_dtype, torch.float32])
    rewards = torch.randn(rows, steps, dtype=torch.float64).to(rewards_dtype)
    values = torch.randn(rows, steps, dtype=torch.float64).to(values_dtype)
    gamma = rng.choice([1.0, 0.0, 0.99, rng.random()])
    lam = rng.choice([1.0, 0.0, 0.95, rng.random()])
    if rng.random() < 0.3:
        gamma = torch.tensor(gamma)
    return rewards, values, mask, gamma, lam


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str,
           inputs: tuple[torch.dtype, ...] = ()) -> None:
    """Same dtype; values within the tolerance of the least precise input (veRL rounds its
    intermediate steps to the inputs' dtype, whatever the result's)."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    atol, rtol = max(TOLERANCE[dtype] for dtype in (expected.dtype, *inputs))
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}\n{m}")


def test_gae_matches_verl_on_random_and_adversarial_cases():
    rng = random.Random(torch.initial_seed())
    with rlengine_verl.apply(gae=True) as patch:
        for case in range(CASES):
            rewards, values, mask, gamma, lam = _draw_gae_case(rng)
            expected = ORIGINALS["gae"](rewards, values, mask, gamma, lam)
            actual = verl_core.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
            what = (f"case {case}: {tuple(rewards.shape)} {rewards.dtype}/{values.dtype} "
                    f"mask {mask.dtype} gamma {gamma} lam {lam}")
            if torch.bfloat16 in (rewards.dtype, values.dtype):
                # veRL's loop rounds every step to bf16, an error that grows along the row:
                # the op (float64 inside) must be at least as close to the float64 truth
                truth = ORIGINALS["gae"](rewards.double(), values.double(), mask, float(gamma),
                                         lam)
                # Whitening then divides each one's own bf16 rounding of the raw advantages by
                # the standard deviation: that much, on top of a bf16 ulp of the result.
                raw = truth[1] - values.double()
                std = float(ORIGINALS["var"](raw, mask)) ** 0.5
                amplified = 4 * 2 ** -8 * float(raw.abs().max()) / (std ** 2 + 1e-8) ** 0.5
                for ours, theirs, exact, name in zip(actual, expected, truth, ("adv", "ret")):
                    assert ours.dtype == theirs.dtype, what
                    slack = 2 ** -7 * (float(exact.abs().max()) + 1)
                    if name == "adv":
                        slack += amplified
                    assert ((ours.double() - exact).abs().max()
                            <= (theirs.double() - exact).abs().max() + slack), (what, name)
                continue
            inputs = (rewards.dtype, values.dtype)
            if isinstance(gamma, torch.Tensor):  # veRL's gamma * lam is rounded to its dtype
                inputs += (gamma.dtype,)
            _close(actual[1], expected[1], what + " returns", inputs)
            _close(actual[0], expected[0], what + " advantages", inputs)
        assert patch.calls("gae") == {"rlengine": CASES}


def test_gae_long_rows_stay_within_float32_rounding():
    rewards, values = torch.randn(4, 4096), torch.randn(4, 4096)
    mask = _mask(4, 4096, "multi_turn", random.Random(0))
    expected = ORIGINALS["gae"](rewards.double(), values.double(), mask, 0.999, 0.95)
    with rlengine_verl.apply(gae=True):
        actual = verl_core.compute_gae_advantage_return(rewards, values, mask, 0.999, 0.95)
    loop = ORIGINALS["gae"](rewards, values, mask, 0.999, 0.95)
    # the op (float64 inside) is at least as close to the float64 truth as veRL's float32 loop
    for ours, theirs, truth in zip(actual, loop, expected):
        assert (ours.double() - truth).abs().max() <= (theirs.double() - truth).abs().max() + 1e-6


@pytest.mark.parametrize("poison", ["nan_reward_masked", "inf_value_masked", "nan_reward_valid"])
def test_gae_non_finite_inputs_run_verls_own_loop(poison):
    rewards, values = torch.randn(3, 20), torch.randn(3, 20)
    mask = torch.ones(3, 20, dtype=torch.int64)
    mask[:, 15:] = 0
    if poison == "nan_reward_masked":
        rewards[1, 17] = float("nan")
    elif poison == "inf_value_masked":
        values[2, 18] = float("inf")
    else:
        rewards[0, 3] = float("nan")
    expected = ORIGINALS["gae"](rewards, values, mask, 0.99, 0.95)
    with rlengine_verl.apply(gae=True) as patch:
        actual = verl_core.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    assert patch.calls("gae") == {"original": 1}
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, equal_nan=True)


def test_gae_weighted_and_bool_masks_behave_as_verl():
    rewards, values = torch.randn(2, 12), torch.randn(2, 12)
    weighted = torch.rand(2, 12)  # veRL multiplies by the mask: a weighting the op has not
    expected = ORIGINALS["gae"](rewards, values, weighted, 0.9, 0.8)
    with rlengine_verl.apply(gae=True) as patch:
        actual = verl_core.compute_gae_advantage_return(rewards, values, weighted, 0.9, 0.8)
        assert patch.calls("gae") == {"original": 1}
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e)
        with pytest.raises(RuntimeError) as ours:
            verl_core.compute_gae_advantage_return(rewards, values, weighted > 0.5, 0.9, 0.8)
    with pytest.raises(RuntimeError) as theirs:
        ORIGINALS["gae"](rewards, values, weighted > 0.5, 0.9, 0.8)
    assert str(ours.value) == str(theirs.value)


def _draw_stats_case(rng: random.Random):
    shape = rng.choice([(rng.randint(1, 50),), (rng.randint(1, 9), rng.randint(1, 70)),
                        (rng.randint(1, 4), rng.randint(1, 5), rng.randint(1, 30))])
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    values = (torch.randn(shape, dtype=torch.float64) * rng.choice([1, 1e-3, 1e3])
              + rng.choice([0, 5, -1e4])).to(dtype)
    mask = torch.rand(shape) < rng.choice([0.1, 0.5, 0.9, 1.0])
    values[~mask] = rng.choice([0.0, float("nan"), float("inf"), 1e30])  # never read
    mask = mask.to(rng.choice([torch.bool, torch.int64, torch.float32]))
    return values, mask


def test_masked_mean_and_var_match_verl():
    rng = random.Random(torch.initial_seed())
    with rlengine_verl.apply(masked_stats=True) as patch:
        for case in range(CASES):
            values, mask = _draw_stats_case(rng)
            axis = rng.choice([None, None, 0, -1, values.dim() - 1])
            what = f"case {case}: {tuple(values.shape)} {values.dtype} mask {mask.dtype} axis {axis}"
            _close_relative(verl_F.masked_mean(values, mask, axis),
                            ORIGINALS["mean"](values, mask, axis), values, what)
            try:
                expected = ORIGINALS["var"](values, mask)
            except ValueError as error:
                with pytest.raises(ValueError, match=str(error)):
                    verl_F.masked_var(values, mask)
                continue
            _close_relative(verl_F.masked_var(values, mask), expected, values, what + " var",
                            squared=True)
        assert patch.calls("masked_stats")["original"] == 0


def _close_relative(actual, expected, values, what, squared=False):
    """veRL sums in the input dtype, the op in float64: compare at the scale of the values."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    finite = values[torch.isfinite(values)].double()
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    scale = max(scale, 1e-30) ** (2 if squared else 1)
    atol, rtol = TOLERANCE[values.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale * 10,
                               rtol=rtol * 10, equal_nan=True, msg=what)


@pytest.mark.parametrize("ones", [0, 1])
def test_var_and_whiten_raise_veRLs_errors_for_a_mask_summing_to_0_or_1(ones):
    values, mask = torch.randn(6), torch.zeros(6, dtype=torch.int64)
    mask[:ones] = 1
    for original, name in ((ORIGINALS["var"], "masked_var"), (ORIGINALS["whiten"], "masked_whiten")):
        with pytest.raises(ValueError) as theirs:
            original(values, mask)
        with rlengine_verl.apply(masked_stats=True, whiten=True):
            with pytest.raises(ValueError) as ours:
                getattr(verl_F, name)(values, mask)
        assert str(ours.value) == str(theirs.value)


def test_masked_whiten_matches_verl_at_every_position():
    rng = random.Random(torch.initial_seed())
    with rlengine_verl.apply(whiten=True) as patch:
        done = 0
        while done < CASES:
            values, mask = _draw_stats_case(rng)
            values = torch.nan_to_num(values, nan=0.5, posinf=2.0, neginf=-2.0)
            if float(mask.sum()) < 2:
                continue
            shift_mean = rng.random() < 0.7
            expected = ORIGINALS["whiten"](values, mask, shift_mean)
            actual = verl_F.masked_whiten(values, mask, shift_mean)
            assert actual.dtype == expected.dtype
            # veRL's statistics accumulate in the input dtype: for a large offset and a small
            # spread (float32 values of -1e4 + 1e-3 noise) its variance is off by percents. The
            # op accumulates in float64: it must be as close to the float64 truth as veRL is,
            # or closer, within the dtype's rounding of the result.
            # Both also compute `values - mean` in the input dtype, which loses up to an ulp of
            # the largest |value| before the scaling by 1/std: that much is allowed on top.
            truth = ORIGINALS["whiten"](values.double(), mask, shift_mean)
            scale = float(truth[torch.isfinite(truth)].abs().max()) + 1.0
            variance = float(ORIGINALS["var"](values.double(), mask))
            largest = float(values.double()[mask.bool()].abs().max())
            rounding = 4 * torch.finfo(values.dtype).eps * largest / (variance + 1e-8) ** 0.5
            ours, theirs = (actual.double() - truth).abs(), (expected.double() - truth).abs()
            rtol = TOLERANCE[values.dtype][1]
            assert float(ours.nan_to_num(0).max()) <= float(theirs.nan_to_num(0).max()) \
                + rtol * scale + rounding, f"case {done}: {tuple(values.shape)} {values.dtype}"
            done += 1
        assert patch.calls("whiten") == {"rlengine": CASES}


def test_a_weighted_mask_runs_verls_own_statistics():
    values, weights = torch.randn(5, 7), torch.rand(5, 7)
    with rlengine_verl.apply() as patch:
        torch.testing.assert_close(verl_F.masked_mean(values, weights),
                                   ORIGINALS["mean"](values, weights))
        torch.testing.assert_close(verl_F.masked_whiten(values, weights),
                                   ORIGINALS["whiten"](values, weights))
    assert patch.calls("masked_stats")["rlengine"] == 0
    assert patch.calls("whiten") == {"original": 1}


def test_apply_reaches_modules_that_imported_by_name_and_revert_restores_them():
    losses = importlib.import_module("verl.workers.utils.losses")  # `from ... import masked_mean`
    assert losses.masked_mean is ORIGINALS["mean"]
    patch = rlengine_verl.apply()
    try:
        assert losses.masked_mean is verl_F.masked_mean is not ORIGINALS["mean"]
        assert verl_core.compute_gae_advantage_return is not ORIGINALS["gae"]
        again = rlengine_verl.apply()  # idempotent: nothing wrapped twice
        assert again.shims == {}
        assert verl_F.masked_mean.__rlengine_original__ is ORIGINALS["mean"]
        again.revert()
        assert losses.masked_mean is not ORIGINALS["mean"]  # the first patch still holds
        # a module imported while the patch is on binds the shim; revert restores it too
        sys.modules.pop("verl.workers.utils.losses")
        late = importlib.import_module("verl.workers.utils.losses")
        assert late is not losses and late.masked_mean is verl_F.masked_mean
    finally:
        patch.revert()
    assert losses.masked_mean is ORIGINALS["mean"] and verl_F.masked_mean is ORIGINALS["mean"]
    assert late.masked_mean is ORIGINALS["mean"]
    assert verl_core.compute_gae_advantage_return is ORIGINALS["gae"]
    patch.revert()  # twice is harmless
    assert verl_F.masked_whiten is ORIGINALS["whiten"]


def test_parts_are_chosen_by_keyword_and_unknown_ones_are_refused():
    with rlengine_verl.apply(gae=True) as patch:
        assert set(patch.shims) == {"verl.trainer.ppo.core_algos.compute_gae_advantage_return"}
        assert verl_F.masked_mean is ORIGINALS["mean"]
    with rlengine_verl.apply(whiten=False) as patch:
        assert verl_F.masked_whiten is ORIGINALS["whiten"] and verl_F.masked_mean is not ORIGINALS["mean"]
    with pytest.raises(TypeError, match="unknown part.*logprob.*the parts are gae"):
        rlengine_verl.apply(logprob=True)


def test_versions_outside_the_tested_range_warn_and_a_missing_package_is_an_import_error():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_version("verl", "verl", "0.1", "0.2")
    assert any("tested with verl >=0.1,<0.2" in str(w.message) for w in caught)
    with pytest.raises(ImportError, match="not-a-trainer is not importable"):
        check_version("not-a-trainer", "not_a_trainer", "1", "2")
