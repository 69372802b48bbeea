"""Tokenization: the offline tokenizer, chat-template rendering with the prompt-prefix property,
plain text with BOS/EOS, truncation rules, and collation (shapes, masks, last_index), checked
with real `transformers` tokenizers and a real (tiny, random) model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_data import HH_FILE, needs_hh
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from rlengine.data import (
    PreferenceDataset,
    PreferencePair,
    PromptDataset,
    PromptExample,
    RankedDataset,
    RankedExample,
    Source,
    collate_pairs,
    collate_prompts,
    collate_ranked,
    example_texts,
    load_preferences,
    load_tokenizer,
    tokenize_pair,
    tokenize_prompt,
    tokenize_ranked,
    train_text_tokenizer,
)
from rlengine.data.tokenize import TruncationStats, _truncate

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast.",
    "Numbers: 1, 2, 3, 42. Unicode: café, naïve, 東京, emoji 🙂.",
] * 20

USER = {"role": "user", "content": "How do I bake bread?"}
ASSISTANT = {"role": "assistant", "content": "Mix flour, water, salt and yeast."}
ASSISTANT_BAD = {"role": "assistant", "content": "Buy it."}


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(CORPUS, vocab_size=400)


def test_trained_tokenizer_round_trips_and_saves(tokenizer, tmp_path):
    for text in CORPUS[:4] + ["never seen: Ωmega ‽ \t tabs  and  spaces"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text  # byte-level: every text decodes back exactly
    assert tokenizer("fox")["input_ids"][0] == tokenizer.bos_token_id
    assert (tokenizer.pad_token_id, tokenizer.bos_token, tokenizer.eos_token) == \
        (0, "<|bos|>", "<|end|>")
    assert 256 + 6 <= len(tokenizer) <= 400
    tokenizer.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded("Paris is nice.")["input_ids"] == tokenizer("Paris is nice.")["input_ids"]
        assert loaded.chat_template == tokenizer.chat_template
        assert loaded.eos_token_id == tokenizer.eos_token_id


def test_trained_tokenizer_arguments():
    with pytest.raises(ValueError, match="vocab_size must be at least 262"):
        train_text_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty text"):
        train_text_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(TypeError, match="texts must be strings"):
        train_text_tokenizer([1, 2], vocab_size=300)
    small = train_text_tokenizer(CORPUS, vocab_size=300, model_max_length=128)
    assert small.model_max_length == 128


def test_load_tokenizer_needs_a_local_folder_and_gives_a_pad_token(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="local folders only"):
        load_tokenizer(tmp_path / "gpt2")
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    no_pad = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")
    no_pad.save_pretrained(tmp_path / "no_pad")
    loaded = load_tokenizer(tmp_path / "no_pad")
    assert loaded.pad_token_id == loaded.eos_token_id == tokenizer.eos_token_id


def test_example_texts_covers_every_field():
    examples = [PreferencePair("p", "c", "r"), PreferencePair(None, [USER], [ASSISTANT]),
                RankedExample([USER], ["a", "b"], [1.0, 0.0]), PromptExample("q")]
    assert list(example_texts(examples)) == ["p", "c", "r", USER["content"],
                                             ASSISTANT["content"], USER["content"], "a", "b", "q"]


def _ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_plain_text_is_bos_prompt_response_eos(tokenizer):
    pair = PreferencePair("What is the capital?", " Paris.", " Rome.", margin=0.5)
    tokenized = tokenize_pair(pair, tokenizer)
    prompt_ids = [tokenizer.bos_token_id] + _ids(tokenizer, "What is the capital?")
    assert tokenized.chosen.input_ids == prompt_ids + _ids(tokenizer, " Paris.") + \
        [tokenizer.eos_token_id]
    assert tokenized.rejected.input_ids[:len(prompt_ids)] == prompt_ids
    assert tokenized.chosen.response_start == tokenized.rejected.response_start == len(prompt_ids)
    assert tokenized.margin == 0.5 and not tokenized.truncated
    no_eos = tokenize_pair(pair, tokenizer, add_eos=False)
    assert no_eos.chosen.input_ids == tokenized.chosen.input_ids[:-1]
    # prompt tokens are what generation starts from
    assert tokenize_prompt(PromptExample(pair.prompt), tokenizer).input_ids == prompt_ids
    # no prompt: the whole text is the response
    whole = tokenize_pair(PreferencePair(None, "A summary.", "Another."), tokenizer)
    assert whole.chosen.response_start == 1  # only the BOS precedes it


def test_plain_text_with_a_tokenizer_that_adds_no_bos_nor_eos(tokenizer):
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = None
    bare = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenized = tokenize_pair(PreferencePair("Hi", " there", " you"), bare)
    assert tokenized.chosen.input_ids == _ids(bare, "Hi") + _ids(bare, " there")
    assert tokenized.chosen.response_start == len(_ids(bare, "Hi"))


@needs_hh
def test_hh_prompt_tokens_are_an_exact_prefix_on_real_pairs():
    pairs = load_preferences(HH_FILE, limit=200)
    tokenizer = train_text_tokenizer(example_texts(pairs), vocab_size=1000)
    data = PreferenceDataset(pairs, tokenizer)
    eos = tokenizer.eos_token_id
    for pair, item in zip(pairs, data):
        prompt_alone = _ids(tokenizer, pair.prompt, special=True)
        for response, sequence in ((pair.chosen, item.chosen), (pair.rejected, item.rejected)):
            assert sequence.input_ids[:sequence.response_start] == prompt_alone
            # here tokenizing prompt and response apart equals tokenizing the whole transcript
            assert sequence.input_ids == _ids(tokenizer, pair.prompt + response, True) + [eos]
            assert tokenizer.decode(sequence.input_ids[sequence.response_start:-1]) == response
    assert data.truncation == TruncationStats(200, 0, 0, 0)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["default", "chatml"])
@pytest.mark.parametrize("prompt, chosen, rejected", [
    ([USER], [ASSISTANT], [ASSISTANT_BAD]),
    ([{"role": "system", "content": "Be brief."}, USER, ASSISTANT, USER],
     [ASSISTANT], [ASSISTANT_BAD, ASSISTANT]),
])
def test_chat_template_prompt_is_an_exact_prefix(tokenizer, template, prompt, chosen, rejected):
    if template == "chatml":
        tokenizer = train_text_tokenizer(CORPUS, vocab_size=400)
        tokenizer.chat_template = CHATML
    tokenized = tokenize_pair(PreferencePair(prompt, chosen, rejected), tokenizer)
    generation_prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                      tokenize=False)
    prompt_ids = _ids(tokenizer, generation_prompt)
    for response, sequence in ((chosen, tokenized.chosen), (rejected, tokenized.rejected)):
        assert sequence.input_ids[:sequence.response_start] == prompt_ids
        whole = tokenizer.apply_chat_template(prompt + response, tokenize=False)
        assert tokenizer.decode(sequence.input_ids) == whole
        assert sequence.input_ids == _ids(tokenizer, whole)
        if template == "default":  # its turns end with EOS, where a reward model reads
            assert sequence.input_ids[-1] == tokenizer.eos_token_id
    assert tokenize_prompt(PromptExample(prompt), tokenizer).input_ids == prompt_ids


def test_chat_template_that_breaks_the_prefix_is_refused(tokenizer):
    broken = train_text_tokenizer(CORPUS, vocab_size=400)
    broken.chat_template = CHATML.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    pair = PreferencePair([USER], [ASSISTANT], [ASSISTANT_BAD], source=Source("f.jsonl", 4))
    with pytest.raises(ValueError, match="f.jsonl:4: the chat template does not render the "
                                         "prompt"):
        tokenize_pair(pair, broken)
    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    with pytest.raises(ValueError, match="example 3: conversational data needs a tokenizer "
                                         "with a chat template"):
        tokenize_pair(PreferencePair([USER], [ASSISTANT], [ASSISTANT_BAD]), bare, index=3)


def _prompt_and_responses(data):
    prompt_len, lengths = data.draw(st.integers(0, 40)), data.draw(
        st.lists(st.integers(1, 40), min_size=1, max_size=4))
    prompt = list(range(1000, 1000 + prompt_len))
    responses = [list(range(2000 + 100 * i, 2000 + 100 * i + n)) for i, n in enumerate(lengths)]
    return prompt, responses


@given(st.data())
def test_truncation_rules(data):
    prompt, responses = _prompt_and_responses(data)
    max_length = data.draw(st.integers(2, 60))
    share = data.draw(st.integers(0, max_length - 1))
    cut = _truncate(prompt, responses, max_length, share)
    longest = max(map(len, responses))
    fits = len(prompt) + longest <= max_length
    kept_prompt = cut[0].input_ids[:cut[0].response_start]
    for sequence, response in zip(cut, responses):
        assert sequence.input_ids[:sequence.response_start] == kept_prompt  # one shared prompt
        kept_response = sequence.input_ids[sequence.response_start:]
        assert len(sequence.input_ids) <= max_length
        assert kept_response == response[:len(kept_response)]  # the response's start stays
        assert len(kept_response) >= 1
        assert sequence.response_tokens_cut == len(response) - len(kept_response)
        assert sequence.prompt_tokens_cut == len(prompt) - len(kept_prompt)
    assert kept_prompt == prompt[len(prompt) - len(kept_prompt):]  # the prompt's end stays
    if fits:
        assert [s.input_ids for s in cut] == [prompt + r for r in responses]
    else:
        # the longest sequence fills max_length exactly
        assert max(len(s.input_ids) for s in cut) == max_length
        # the prompt keeps its share, or more when the longest response leaves room
        assert len(kept_prompt) == min(len(prompt), max(share, max_length - longest))
        if any(s.response_tokens_cut for s in cut):
            assert len(kept_prompt) == min(len(prompt), share)


def test_truncation_through_tokenize_pair(tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    long_response, short_response = " Paris is the capital of France." * 6, " No."
    pair = PreferencePair(prompt, long_response, short_response)
    full = tokenize_pair(pair, tokenizer)
    prompt_ids = full.chosen.input_ids[:full.chosen.response_start]
    chosen_ids = full.chosen.input_ids[full.chosen.response_start:]
    assert len(prompt_ids) > 20 and len(chosen_ids) > 30
    # both long: the prompt keeps its last max_prompt_length tokens, the responses their start
    cut = tokenize_pair(pair, tokenizer, max_length=40, max_prompt_length=16)
    assert cut.chosen.input_ids == prompt_ids[-16:] + chosen_ids[:24]
    assert cut.rejected.input_ids[:16] == prompt_ids[-16:]
    assert cut.rejected.response_tokens_cut == 0 and cut.truncated
    # default share: max_length // 2
    half = tokenize_pair(pair, tokenizer, max_length=40)
    assert half.chosen.input_ids == prompt_ids[-20:] + chosen_ids[:20]
    # a short pair keeps its prompt longer than the share when the responses leave room
    short = PreferencePair(prompt, short_response, " Yes.")
    whole = tokenize_pair(short, tokenizer)
    longest = max(whole.chosen.response_length, whole.rejected.response_length)
    max_length = len(prompt_ids) + longest - 5
    roomy = tokenize_pair(short, tokenizer, max_length=max_length, max_prompt_length=4)
    assert roomy.chosen.response_tokens_cut == roomy.rejected.response_tokens_cut == 0
    assert roomy.chosen.prompt_tokens_cut == 5
    assert roomy.chosen.input_ids == prompt_ids[5:] + whole.chosen.input_ids[len(prompt_ids):]
    assert tokenize_pair(short, tokenizer, max_length=1000).truncated is False
    with pytest.raises(ValueError, match=r"max_prompt_length must be an int in \[0, max_length\)"):
        tokenize_pair(pair, tokenizer, max_length=10, max_prompt_length=10)
    with pytest.raises(ValueError, match="give max_length too"):
        tokenize_pair(pair, tokenizer, max_prompt_length=10)
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        tokenize_pair(pair, tokenizer, max_length=1)


def test_truncation_stats(tokenizer):
    pairs = [PreferencePair("Short?", " Yes.", " No."),
             PreferencePair("A long prompt, " * 20, " Yes.", " No."),
             PreferencePair("Short?", " A long answer," * 20, " No.")]
    data = PreferenceDataset(pairs, tokenizer, max_length=24, max_prompt_length=12)
    assert data.truncation == TruncationStats(examples=3, truncated=2, prompt_truncated=1,
                                              response_truncated=1)
    assert str(data.truncation) == "2 of 3 examples truncated (1 prompts cut, 1 with a " \
                                   "response cut)"
    prompts = PromptDataset([PromptExample("A long prompt, " * 20), PromptExample("Hi")],
                            tokenizer, max_length=8)
    assert prompts.truncation == TruncationStats(2, 1, 1, 0)
    assert prompts[0].input_ids == tokenize_prompt(PromptExample("A long prompt, " * 20),
                                                   tokenizer).input_ids[-8:]


PAIRS = [
    PreferencePair("What is the capital of France?", " Paris.", " Rome, surely.", margin=1.0),
    PreferencePair("Hi", " Hello there, how can I help?", " Bye.", margin=None),
    PreferencePair([USER], [ASSISTANT], [ASSISTANT_BAD], margin=-0.5),
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_pairs(tokenizer, padding_side):
    items = [tokenize_pair(p, tokenizer, index=i) for i, p in enumerate(PAIRS)]
    batch = collate_pairs(items, tokenizer.pad_token_id, padding_side)
    longest = max(len(s.input_ids) for item in items for s in (item.chosen, item.rejected))
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_input_ids"].shape == (3, longest)
        assert batch[f"{side}_input_ids"].dtype == torch.long
        assert batch[f"{side}_attention_mask"].dtype == torch.long
        assert batch[f"{side}_response_mask"].dtype == torch.bool
        for row, item in enumerate(items):
            sequence = getattr(item, side)
            ids, mask = batch[f"{side}_input_ids"][row], batch[f"{side}_attention_mask"][row]
            assert ids[mask.bool()].tolist() == sequence.input_ids
            assert (ids[~mask.bool()] == tokenizer.pad_token_id).all()
            response = batch[f"{side}_response_mask"][row]
            assert ids[response].tolist() == sequence.input_ids[sequence.response_start:]
            assert not (response & ~mask.bool()).any()
            last = batch[f"{side}_last_index"][row]
            assert mask[last] == 1 and ids[last] == sequence.input_ids[-1]
            if padding_side == "right":
                assert last == len(sequence.input_ids) - 1
            else:
                assert last == longest - 1
    assert batch["margin"][0] == 1.0 and batch["margin"][1].isnan() and batch["margin"][2] == -0.5
    assert batch["has_margin"].tolist() == [True, False, True]
    assert batch["index"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="padding_side"):
        collate_pairs(items, 0, "middle")
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([], 0)


def test_collate_ranked(tokenizer):
    examples = [RankedExample("Pick one:", [" A", " Bb bb", " C c c c"], [1.0, 3.0, 2.0]),
                RankedExample([USER], [[ASSISTANT], [ASSISTANT_BAD]], [0.0, -1.0])]
    data = RankedDataset(examples, tokenizer)
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"].shape[0] == 5
    assert batch["query_index"].tolist() == [0, 0, 0, 1, 1]
    assert batch["num_responses"].tolist() == [3, 2]
    assert batch["scores"].tolist() == [1.0, 3.0, 2.0, 0.0, -1.0]
    assert batch["index"].tolist() == [0, 1]
    flat = [s for item in (data[0], data[1]) for s in item.responses]
    for row, sequence in enumerate(flat):
        assert batch["input_ids"][row][batch["response_mask"][row]].tolist() == \
            sequence.input_ids[sequence.response_start:]
        assert batch["last_index"][row] == len(sequence.input_ids) - 1
    one = tokenize_ranked(examples[0], tokenizer)
    assert [s.input_ids for s in one.responses] == [s.input_ids for s in data[0].responses]
    assert collate_ranked([one], 0)["input_ids"].shape[0] == 3


def test_collate_prompts_left_pads_for_generation(tokenizer):
    data = PromptDataset([PromptExample("Hi"), PromptExample("What is the capital of France?"),
                          PromptExample([USER])], tokenizer)
    batch = data.collate([data[i] for i in range(3)])
    lengths = [len(data[i].input_ids) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert (batch["attention_mask"][:, -1] == 1).all()  # every prompt ends at the last column
    for row in range(3):
        assert batch["attention_mask"][row].sum() == lengths[row]
        assert batch["input_ids"][row, -lengths[row]:].tolist() == data[row].input_ids
    right = collate_prompts([data[0], data[1]], 0, padding_side="right")
    assert right["input_ids"][0, :lengths[0]].tolist() == data[0].input_ids


def test_reward_read_at_last_index_matches_the_unpadded_sequence(tokenizer):
    # What a reward model does with a collated batch: hidden state at last_index. Right padding
    # must not change it.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    data = PreferenceDataset(PAIRS, tokenizer)
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=data.collate)
    batch = next(iter(loader))
    with torch.no_grad():
        hidden = model(input_ids=batch["chosen_input_ids"],
                       attention_mask=batch["chosen_attention_mask"]).last_hidden_state
        read = hidden[torch.arange(3), batch["chosen_last_index"]]
        for row, item in enumerate(data):
            alone = model(input_ids=torch.tensor([item.chosen.input_ids])).last_hidden_state
            torch.testing.assert_close(read[row], alone[0, -1], atol=1e-5, rtol=1e-5)
