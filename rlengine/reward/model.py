"""The reward model: a `transformers` backbone with a bias-free value head at every position
(METHODS.md sections 1 and 3), its three sequence read-outs, its own checkpoint format and an
export to ``AutoModelForSequenceClassification`` so that other tools can score with it."""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:  # transformers' model classes load when a model is first built (seconds)
    from transformers import PreTrainedModel

from rlengine import ops

ScoreMode = Literal["last", "segment", "token_mean"]
SCORE_MODES = get_args(ScoreMode)

CONFIG_NAME = "reward_model.json"
HEAD_NAME = "value_head.safetensors"
FORMAT = "rlengine.RewardModel"
FORMAT_VERSION = 1


@dataclass
class RewardOutput:
    """``values [B, T]`` (float32): the head's value at every position; ``hidden_states
    [B, T, H]``: the backbone's last layer (the vectors fed to the head, in the backbone's
    dtype), which contrastive losses read at the last token."""

    values: torch.Tensor
    hidden_states: torch.Tensor


class RewardModel(torch.nn.Module):
    """A backbone plus ``value_head = nn.Linear(hidden_size, 1, bias=False)`` at every position.

    ``backbone`` is a base model (``LlamaModel``, ``GPT2Model``, ...) or a model with a head
    (``*ForCausalLM``, e.g. the SFT policy), whose body (``base_model``) is used and *shared*:
    deep-copy a policy you keep training. ``head_init_std`` defaults to ``1 / sqrt(H + 1)``
    (Ziegler et al. 2019), which starts rewards near unit scale whatever the width.
    """

    def __init__(self, backbone: PreTrainedModel, *, head_init_std: float | None = None):
        super().__init__()
        from transformers import PreTrainedModel

        if not isinstance(backbone, PreTrainedModel):
            raise TypeError(f"backbone must be a transformers PreTrainedModel, got "
                            f"{type(backbone).__name__}")
        self.backbone = backbone.base_model
        hidden_size = self.backbone.config.get_text_config().hidden_size
        if head_init_std is None:
            head_init_std = 1.0 / math.sqrt(hidden_size + 1)
        if not (math.isfinite(head_init_std) and head_init_std >= 0):
            raise ValueError(f"head_init_std must be finite and >= 0, got {head_init_std}")
        self.value_head = torch.nn.Linear(hidden_size, 1, bias=False)
        torch.nn.init.normal_(self.value_head.weight, std=head_init_std)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> RewardOutput:
        """``position_ids`` (optional, [B, T]): give them for left-padded rows (rollouts), so
        that a backbone with learned absolute positions (GPT-2) sees the positions it saw
        during generation; None lets the backbone count from 0 at the first column."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape "
                             f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids must have input_ids' shape "
                             f"{tuple(input_ids.shape)}, got {tuple(position_ids.shape)}")
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return RewardOutput(values=values.float(), hidden_states=hidden)

    @staticmethod
    def score(values: torch.Tensor, *, mode: ScoreMode = "last",
              last_index: torch.Tensor | None = None,
              response_mask: torch.Tensor | None = None,
              segment_ids: torch.Tensor | None = None,
              counts: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence rewards ``[B]`` (float32) from per-position ``values [B, T]``.

        ``"last"``: the value at ``last_index [B]`` (the last real token, EOS: the paper's
        reward model; ``collate_pairs``' ``*_last_index``).
        ``"token_mean"``: the mean over ``response_mask [B, T]`` (METHODS.md's token level,
        "all response tokens except EOS": the caller drops EOS from the mask, e.g.
        ``response_mask & (input_ids != eos_token_id)``); 0 for an empty row.
        ``"segment"``: the mean of the values at the segment ends of ``segment_ids, counts``
        (from ``ops.entropy_segments``), i.e. ``ops.segment_reduce(..., reduce="end_mean")``.
        """
        if mode not in SCORE_MODES:
            raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
        if not isinstance(values, torch.Tensor) or values.ndim != 2:
            raise ValueError(f"values must be a [B, T] tensor, got "
                             f"{getattr(values, 'shape', type(values).__name__)}")
        if mode == "last":
            index = _required("last_index", last_index, mode)
            if index.shape != values.shape[:1] or index.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"last_index must be an int [B={values.shape[0]}] tensor, got "
                                 f"{index.dtype} {tuple(index.shape)}")
            if index.numel() and (index.min() < 0 or index.max() >= values.shape[1]):
                raise ValueError(f"last_index must be in [0, {values.shape[1]}), got values in "
                                 f"[{int(index.min())}, {int(index.max())}]")
            return values.gather(1, index.long().unsqueeze(1)).squeeze(1).float()
        if mode == "token_mean":
            mask = _required("response_mask", response_mask, mode)
            if mask.shape != values.shape:
                raise ValueError(f"response_mask must have values' shape "
                                 f"{tuple(values.shape)}, got {tuple(mask.shape)}")
            mask = mask.bool()
            total = torch.where(mask, values.float(), 0.0).sum(-1)
            return total / mask.sum(-1).clamp(min=1)
        ids = _required("segment_ids", segment_ids, mode)
        row_counts = _required("counts", counts, mode)
        return ops.segment_reduce(values, ids, row_counts, reduce="end_mean").float()

    # ---- checkpoints -------------------------------------------------------------------------

    @classmethod
    def from_backbone_name_or_path(cls, path: str | Path, *, head_init_std: float | None = None,
                                   **from_pretrained_kwargs: Any) -> RewardModel:
        """A fresh reward model on a pretrained backbone: a local ``transformers`` checkpoint
        (a base model or a ``*ForCausalLM``, whose LM head is dropped), loaded with
        ``AutoModel.from_pretrained(path, **from_pretrained_kwargs)``."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, **from_pretrained_kwargs)
        return cls(backbone, head_init_std=head_init_std)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Writes the backbone (``transformers`` ``save_pretrained``, safetensors; so
        ``AutoModel.from_pretrained(directory)`` gives the backbone), ``value_head.safetensors``,
        ``reward_model.json`` and, if given, the tokenizer. Returns the directory."""
        directory = Path(directory)
        self.backbone.save_pretrained(directory, safe_serialization=True)
        save_file({"weight": self.value_head.weight.detach().cpu().contiguous()},
                  directory / HEAD_NAME)
        meta = {"format": FORMAT, "version": FORMAT_VERSION,
                "backbone_class": type(self.backbone).__name__,
                "hidden_size": self.value_head.in_features}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, **from_pretrained_kwargs: Any) -> RewardModel:
        """A reward model written by ``save_pretrained``."""
        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: not a RewardModel checkpoint "
                                    f"(for a bare backbone use from_backbone_name_or_path)")
        meta = json.loads(config_file.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{config_file}: unsupported format {meta.get('format')!r} "
                             f"version {meta.get('version')!r}")
        model = cls.from_backbone_name_or_path(directory, head_init_std=0.0,
                                               **from_pretrained_kwargs)
        weight = load_file(directory / HEAD_NAME)["weight"]
        if weight.shape != model.value_head.weight.shape:
            raise ValueError(f"{directory / HEAD_NAME}: head weight {tuple(weight.shape)} does "
                             f"not fit hidden size {model.value_head.in_features}")
        with torch.no_grad():
            model.value_head.weight.copy_(weight)
        return model


def _required(name: str, tensor: torch.Tensor | None, mode: str) -> torch.Tensor:
    if tensor is None:
        raise ValueError(f"score mode {mode!r} needs {name}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    return tensor


def export_sequence_classifier(reward_model: RewardModel, out_dir: str | Path,
                               tokenizer: Any = None, *, pad_token_id: int | None = None
                               ) -> Path:
    """Write ``reward_model`` as an ``AutoModelForSequenceClassification`` checkpoint
    (``num_labels=1``) whose logit equals ``RewardModel.score(mode="last")``.

    Those classes read the rightmost token that is not ``config.pad_token_id``, so the two agree
    on any batch padded with ``pad_token_id`` (taken from the argument, else the tokenizer,
    else the backbone's config) as long as no row's last real token is that id. A pad id equal
    to EOS breaks that for rows that end in EOS (they would be read one token early): a
    warning says so. Returns ``out_dir``.
    """
    body = reward_model.backbone
    for candidate in (pad_token_id, getattr(tokenizer, "pad_token_id", None),
                      body.config.pad_token_id):
        if candidate is not None:
            pad_token_id = int(candidate)
            break
    else:
        raise ValueError("pad_token_id is unknown (not given, no tokenizer pad token, none in "
                         "the backbone config): sequence classifiers need it to find the last "
                         "token of a padded row")
    eos = body.config.eos_token_id
    if pad_token_id in (eos if isinstance(eos, list) else [eos]):
        warnings.warn(f"pad_token_id {pad_token_id} is also EOS: the exported classifier will "
                      "score rows that end in EOS at the token before it", stacklevel=2)
    config = copy.deepcopy(body.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.architectures = None
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_config(config)
    head = getattr(classifier, "score", None)
    if not (isinstance(head, torch.nn.Linear) and head.bias is None):
        raise NotImplementedError(f"{type(classifier).__name__} has no bias-free `score` head "
                                  f"to hold the value head")
    classifier.base_model.load_state_dict(body.state_dict(), strict=True)
    with torch.no_grad():
        head.weight.copy_(reward_model.value_head.weight)
    classifier.to(body.dtype)
    out_dir = Path(out_dir)
    classifier.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
