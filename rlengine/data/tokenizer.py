"""Tokenizers without the Hugging Face hub: train one on the data at hand, or load one from a
local folder.

`train_text_tokenizer` trains a byte-level BPE (the `tokenizers` library) on the given texts
and wraps it as a `transformers` fast tokenizer with BOS/EOS/pad tokens and a small chat
template; it saves with ``save_pretrained`` and loads back with ``AutoTokenizer``. Byte-level
BPE needs no unknown token and decodes every text back exactly. This is how `rlengine train-rm`
gets a tokenizer for real text (HH-RLHF) on a machine that cannot reach the hub; a tokenizer
already on disk (``save_pretrained`` output of any model) works through `load_tokenizer`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlengine.data.types import Demonstration, PreferencePair, PromptExample, RankedExample, Text

__all__ = ["BOS_TOKEN", "CHAT_TEMPLATE", "EOS_TOKEN", "PAD_TOKEN", "ROLE_TOKENS",
           "example_texts", "load_tokenizer", "tokenizer_folder", "train_text_tokenizer"]

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
# EOS also closes every chat turn, so a response rendered by the chat template ends with EOS,
# the token whose hidden state a reward model reads.
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One line per turn header: "<|role|>\n" + content + EOS. The generation prompt is the
# assistant header alone, so a prompt rendered with add_generation_prompt=True is an exact
# text prefix of the conversation with the assistant's reply appended.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 8192, *,
                         min_frequency: int = 2, model_max_length: int | None = None,
                         chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE `transformers.PreTrainedTokenizerFast` trained on `texts`.

    Special tokens: ``<|pad|>`` (id 0), ``<|bos|>``, ``<|end|>`` (EOS), and the role headers
    ``<|system|>``, ``<|user|>``, ``<|assistant|>`` of the chat template. Plain-text encoding
    with ``add_special_tokens=True`` prepends BOS; the chat template writes BOS itself (encode
    its output with ``add_special_tokens=False``). `vocab_size` counts the 256 byte symbols and
    the special tokens; a small corpus may stop short of it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS]
    minimum = len(specials) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + "
                         f"{len(specials)} special tokens), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_nonempty(texts), trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)])
    options: dict[str, Any] = {}
    if model_max_length is not None:
        options["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=chat_template, **options)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    count = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        if text:
            count += 1
            yield text
    if count == 0:
        raise ValueError("no non-empty text to train the tokenizer on")


def example_texts(examples: Iterable[PreferencePair | RankedExample | PromptExample
                                     | Demonstration]) -> Iterator[str]:
    """Every text of the examples (message contents for conversations): the corpus to train a
    tokenizer on."""
    for example in examples:
        if isinstance(example, PreferencePair):
            fields: list[Text | None] = [example.prompt, example.chosen, example.rejected]
        elif isinstance(example, RankedExample):
            fields = [example.prompt, *example.responses]
        elif isinstance(example, PromptExample):
            fields = [example.prompt]
        elif isinstance(example, Demonstration):
            fields = [example.prompt, example.response]
        else:
            raise TypeError(f"not an example: {type(example).__name__}")
        for text in fields:
            if isinstance(text, str):
                yield text
            elif isinstance(text, list):
                yield from (message["content"] for message in text)


def tokenizer_folder(path: str | Path) -> Path:
    """The folder holding the tokenizer of ``path``: ``path`` itself, or the ``model`` folder
    of a run directory (what `rlengine train-rm` and `rlengine sft` write to --output-dir:
    the final model and its tokenizer are in ``<output-dir>/model``)."""
    folder = Path(path)
    if not _has_tokenizer(folder) and _has_tokenizer(folder / "model"):
        return folder / "model"
    return folder


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def load_tokenizer(path: str | Path):
    """A tokenizer saved in a local folder (``save_pretrained`` output), or in the ``model``
    folder of a `rlengine train-rm` / `rlengine sft` run directory; never fetched from the
    hub. A tokenizer without a pad token gets its EOS as pad token: padding positions are masked
    out everywhere, so which id fills them does not matter, but collation needs one."""
    from transformers import AutoTokenizer

    folder = tokenizer_folder(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no tokenizer folder at {folder}: tokenizers are loaded from local folders only "
            "(the hub is not used); make one with train_text_tokenizer(...).save_pretrained()")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {folder} has neither a pad nor an EOS token; "
                             "set tokenizer.pad_token before collating")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
