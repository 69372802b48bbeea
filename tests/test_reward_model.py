"""RewardModel: values at every position, its three read-outs against hand computations,
padding invariance, its checkpoint round trip and the AutoModelForSequenceClassification export,
on the synthetic task's tiny Llama and GPT-2 backbones."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Model, LlamaModel

from rlengine import ops
from rlengine.data import collate_pairs, tokenize_pair
from rlengine.reward import RewardModel, RewardOutput, export_sequence_classifier
from rlengine.synthetic import SyntheticTask

TASKS = {"llama": SyntheticTask(seed=0),
         "gpt2": SyntheticTask(seed=0, model={"architecture": "gpt2"})}


def _model(architecture="llama", seed=0) -> RewardModel:
    model = RewardModel(TASKS[architecture].make_reward_backbone(seed))
    return model.eval()


def _batch(architecture="llama", n=4) -> dict[str, torch.Tensor]:
    """Real pairs of different lengths, right-padded by the data layer."""
    task = TASKS[architecture]
    pairs = [tokenize_pair(p, task.tokenizer) for p in task.preference_pairs(n, seed=3)]
    batch = collate_pairs(pairs, task.tokenizer.pad_token_id)
    lengths = batch["chosen_attention_mask"].sum(-1)
    assert lengths.min() < lengths.max()  # the padding cases below need ragged rows
    return {k.removeprefix("chosen_"): v for k, v in batch.items() if k.startswith("chosen_")}


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_values_shape_dtype_and_hidden_states(architecture):
    model, batch = _model(architecture), _batch(architecture)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert isinstance(out, RewardOutput)
    b, t = batch["input_ids"].shape
    assert out.values.shape == (b, t) and out.values.dtype == torch.float32
    assert out.hidden_states.shape == (b, t, model.value_head.in_features)
    # The values are the head applied to the returned hidden states.
    torch.testing.assert_close(out.values, out.hidden_states @ model.value_head.weight[0])
    assert model.value_head.bias is None
    assert out.values.std() > 0


def test_head_init_std():
    backbone = TASKS["llama"].make_reward_backbone(0)
    hidden = backbone.config.hidden_size
    assert RewardModel(backbone, head_init_std=0.0).value_head.weight.abs().max() == 0
    big = RewardModel(backbone, head_init_std=10.0).value_head.weight.std()
    default = RewardModel(backbone).value_head.weight.std()
    assert 2.0 < big < 20.0
    assert 0.3 / hidden**0.5 < default < 3.0 / hidden**0.5


def test_causal_lm_gives_its_base_model():
    policy = TASKS["llama"].make_policy(0)
    model = RewardModel(policy)
    assert isinstance(model.backbone, LlamaModel)
    assert model.backbone is policy.model  # shared, as documented
    assert "lm_head" not in dict(model.named_parameters())
    gpt2 = RewardModel(TASKS["gpt2"].make_policy(0))
    assert isinstance(gpt2.backbone, GPT2Model)


def test_score_last_token_mean_segment_by_hand():
    values = torch.randn(3, 7)
    last_index = torch.tensor([6, 2, 4])
    got = RewardModel.score(values, mode="last", last_index=last_index)
    torch.testing.assert_close(got, torch.stack([values[0, 6], values[1, 2], values[2, 4]]))

    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 1] = True  # row 2 empty: 0
    got = RewardModel.score(values, mode="token_mean", response_mask=mask)
    want = torch.stack([values[0, 2:6].mean(), values[1, 1], torch.tensor(0.0)])
    torch.testing.assert_close(got, want)

    # Segments ending where the entropy is high, and at the last response token.
    entropy = torch.zeros(3, 7)
    entropy[0, 3] = 5.0
    segment_ids, counts = ops.entropy_segments(entropy, mask, threshold=1.0)
    got = RewardModel.score(values, mode="segment", segment_ids=segment_ids, counts=counts)
    want = torch.stack([(values[0, 3] + values[0, 5]) / 2, values[1, 1], torch.tensor(0.0)])
    torch.testing.assert_close(got, want)


def test_score_is_differentiable():
    values = torch.randn(2, 5, requires_grad=True)
    RewardModel.score(values, last_index=torch.tensor([4, 1])).sum().backward()
    want = torch.zeros(2, 5)
    want[0, 4] = want[1, 1] = 1
    torch.testing.assert_close(values.grad, want)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_padded_and_unpadded_rows_give_the_same_last_score(architecture):
    model, batch = _model(architecture), _batch(architecture)
    with torch.no_grad():
        padded = model.score(model(batch["input_ids"], batch["attention_mask"]).values,
                             last_index=batch["last_index"])
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            alone = model(batch["input_ids"][row:row + 1, :length]).values[0, length - 1]
            torch.testing.assert_close(padded[row], alone, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    model, batch = _model(seed=1), _batch()
    with torch.no_grad():
        model.value_head.weight.mul_(3.0)  # not what a fresh head would be
    model.save_pretrained(tmp_path, tokenizer=TASKS["llama"].tokenizer)
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "value_head.safetensors").is_file()
    assert json.loads((tmp_path / "reward_model.json").read_text())["backbone_class"] == \
        "LlamaModel"
    loaded = RewardModel.load(tmp_path).eval()
    with torch.no_grad():
        want = model(batch["input_ids"], batch["attention_mask"]).values
        got = loaded(batch["input_ids"], batch["attention_mask"]).values
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_from_backbone_name_or_path_takes_a_causal_lm_checkpoint(tmp_path):
    policy = TASKS["llama"].make_policy(2).eval()
    policy.save_pretrained(tmp_path)
    model = RewardModel.from_backbone_name_or_path(tmp_path).eval()
    assert isinstance(model.backbone, LlamaModel)
    batch = _batch()
    with torch.no_grad():
        want = policy.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
        got = model(batch["input_ids"], batch["attention_mask"]).hidden_states
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_export_sequence_classifier_scores_like_last(tmp_path, architecture):
    model, batch = _model(architecture, seed=4), _batch(architecture)
    tokenizer = TASKS[architecture].tokenizer
    export_sequence_classifier(model, tmp_path, tokenizer)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert classifier.config.num_labels == 1
    assert classifier.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        want = model.score(model(batch["input_ids"], batch["attention_mask"]).values,
                           last_index=batch["last_index"])
        got = classifier(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
    assert got.shape == (batch["input_ids"].shape[0], 1)
    torch.testing.assert_close(got[:, 0], want, atol=1e-5, rtol=1e-5)


def test_export_warns_when_pad_is_eos(tmp_path):
    model = _model()
    eos = model.config.eos_token_id
    with pytest.warns(UserWarning, match="also EOS"):
        export_sequence_classifier(model, tmp_path, pad_token_id=eos)


def test_bad_arguments_raise_named_errors(tmp_path):
    values = torch.randn(2, 5)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        RewardModel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="head_init_std"):
        RewardModel(TASKS["llama"].make_reward_backbone(0), head_init_std=-1.0)
    with pytest.raises(ValueError, match="mode"):
        RewardModel.score(values, mode="first", last_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs last_index"):
        RewardModel.score(values)
    with pytest.raises(ValueError, match="last_index must be in"):
        RewardModel.score(values, last_index=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="last_index must be an int"):
        RewardModel.score(values, last_index=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="response_mask must have"):
        RewardModel.score(values, mode="token_mean", response_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="needs counts"):
        RewardModel.score(values, mode="segment", segment_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="values must be"):
        RewardModel.score(values[0], last_index=torch.tensor([0]))
    model = _model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="reward_model.json"):
        RewardModel.load(tmp_path)
