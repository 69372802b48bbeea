"""The acceptance script (python -m rlengine.reward.acceptance) runs every part end to end and
its numbers are consistent; the full-size numbers are in the README, measured with it."""

import json

import pytest
import torch

from rlengine.reward import acceptance


@pytest.mark.slow
def test_acceptance_script_small(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "acceptance.json"
    try:
        code = acceptance.main(["--seeds", "1", "--pairs", "256", "--validation", "128",
                                "--voters", "2", "--voter-steps", "8", "--steps", "16",
                                "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    expected = {"strength_auc", "strength_negative_share", "lowest_decile_flipped_share",
                "lowest_decile_rm", "plain_bt", "soft_margin", "flip_soft_margin", "bandit_rm",
                "segment_rm", "token_rm", "bandit_rm_untrained", "segment_rm_untrained",
                "token_rm_untrained"}
    assert expected <= set(run)
    for key in expected:
        assert 0.0 <= run[key] <= 1.0, key
    # the bandit model and plain BT are the same run (same seed, same options)
    assert run["bandit_rm"] == run["plain_bt"]
    assert "plain_bt" in capsys.readouterr().out


def test_roc_auc():
    scores = torch.tensor([0.9, 0.8, 0.1, 0.8])
    positive = torch.tensor([True, False, False, True])
    # positives 0.9 and 0.8 against negatives 0.8 and 0.1: 3 wins and one tie of 4
    assert acceptance.roc_auc(scores, positive) == pytest.approx(3.5 / 4)
