"""The synthetic task's words and its tokenizer.

Every token is a whole word, so a text is a plain string of space-separated words and the
tokenizer is a word-level lookup: tokenization is exact and invertible, which lets tests and
the gold reward reason about texts and token ids interchangeably.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# Ends every prompt: the model needs a marker to know where the symbols stop and its answer
# begins (prompts have varying lengths).
ANSWER_MARKER = "="

# The transformations a prompt can ask for, applied to its symbols.
ALL_OPS = ("copy", "reverse", "sort")

# Symbol words in alphabetical order, so that "sort" means alphabetical order and the order of a
# symbol in this tuple is its sort key.
ALL_SYMBOLS = (
    "ant", "bear", "cat", "deer", "eel", "fox", "goat", "hen", "ibis", "jay", "kiwi", "lion",
    "mole", "newt", "owl", "pig", "quail", "rat", "seal", "toad", "urchin", "vole", "wolf", "yak",
)

# Filler words: never part of a correct answer; a response containing one is penalised at that
# position. They make one kind of error visible without reading the prompt (easy to learn for a
# reward model), while wrong symbols need the prompt (hard), which sets the task's difficulty.
FILLERS = ("um", "uh", "hmm", "err", "like", "oops")

# Renders a conversation as the plain texts the task uses: each turn's words separated by a
# space, an assistant turn closed by EOS. The prompt rendered with add_generation_prompt=True is
# then an exact token prefix of the prompt rendered with its answer.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ message['content'] + eos_token + ' ' }}"
    "{%- else -%}"
    "{{ message['content'] + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def vocabulary(ops: tuple[str, ...], n_symbols: int) -> list[str]:
    """The task's words in id order: specials (ids 0-3), the answer marker, ops, symbols,
    fillers."""
    return [*SPECIAL_TOKENS, ANSWER_MARKER, *ops, *ALL_SYMBOLS[:n_symbols], *FILLERS]


def build_tokenizer(words: list[str], *, model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A word-level `PreTrainedTokenizerFast` over ``words`` (ids in list order; the first four
    must be pad, bos, eos, unk). Text is split on whitespace; an unknown word becomes <unk>.

    It adds no special tokens on its own (like GPT-2's), so tokenizing a prompt and a response
    separately and concatenating the ids gives the ids of the joined text; callers append EOS to
    responses themselves. Its chat template renders a user turn as its text and an assistant
    turn as its text followed by EOS.
    """
    if tuple(words[:4]) != SPECIAL_TOKENS:
        raise ValueError(f"words must start with {SPECIAL_TOKENS}, got {words[:4]}")
    if len(set(words)) != len(words):
        raise ValueError("words must be distinct")
    if any(not w or any(c.isspace() for c in w) for w in words):
        raise ValueError("words must be non-empty and contain no whitespace")
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        chat_template=CHAT_TEMPLATE, model_max_length=model_max_length, padding_side="right")
