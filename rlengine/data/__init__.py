"""Data: loading preference, ranked, prompt-only and SFT data, and tokenizing it.

    pairs = load_preferences("pairs.jsonl")                 # or .json, .parquet, a Dataset...
    tokenizer = load_tokenizer("my-model/")                 # a local folder, or:
    tokenizer = train_text_tokenizer(example_texts(pairs), vocab_size=8192)
    data = PreferenceDataset(pairs, tokenizer, max_length=512)
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=data.collate)
    write_preferences(pairs, "pairs.jsonl")                 # reads back with load_preferences

See rlengine.data.loaders (formats, how the prompt is found, errors), rlengine.data.tokenize
(rendering, truncation, collated tensors), rlengine.data.tokenizer (offline tokenizers) and
rlengine.data.writers (writing pairs back as JSON lines)."""

from rlengine.data.loaders import (
    DataFormatError,
    SkippedRowsWarning,
    load_demonstrations,
    load_preferences,
    load_prompts,
    load_ranked,
    load_samples,
)
from rlengine.data.tokenize import (
    DemonstrationDataset,
    PreferenceDataset,
    PromptDataset,
    RankedDataset,
    TokenizedDemonstration,
    TokenizedPair,
    TokenizedPrompt,
    TokenizedRanked,
    TokenizedSequence,
    TruncationStats,
    collate_demonstrations,
    collate_pairs,
    collate_prompts,
    collate_ranked,
    pad_token_id,
    tokenize_demonstration,
    tokenize_pair,
    tokenize_prompt,
    tokenize_ranked,
)
from rlengine.data.tokenizer import example_texts, load_tokenizer, train_text_tokenizer
from rlengine.data.transcripts import is_hh_transcript, split_conversations, split_hh_transcripts
from rlengine.data.types import (
    Demonstration,
    PreferencePair,
    PromptExample,
    RankedExample,
    Source,
)
from rlengine.data.writers import write_preferences

__all__ = [
    "DataFormatError", "Demonstration", "DemonstrationDataset", "PreferenceDataset",
    "PreferencePair", "PromptDataset", "PromptExample", "RankedDataset", "RankedExample",
    "SkippedRowsWarning", "Source", "TokenizedDemonstration", "TokenizedPair", "TokenizedPrompt",
    "TokenizedRanked", "TokenizedSequence", "TruncationStats", "collate_demonstrations",
    "collate_pairs", "collate_prompts", "collate_ranked", "example_texts", "is_hh_transcript",
    "load_demonstrations", "load_preferences", "load_prompts", "load_ranked", "load_samples",
    "load_tokenizer", "pad_token_id", "split_conversations", "split_hh_transcripts",
    "tokenize_demonstration", "tokenize_pair", "tokenize_prompt", "tokenize_ranked",
    "train_text_tokenizer", "write_preferences",
]
