"""Loading preference, ranked and prompt data: every source format, every text format, the
HH-RLHF split (on the real file), and one error per kind of malformed row."""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from rlengine.data import (
    DataFormatError,
    PreferencePair,
    SkippedRowsWarning,
    Source,
    load_preferences,
    load_prompts,
    load_ranked,
    load_samples,
    split_conversations,
    split_hh_transcripts,
)
from rlengine.data.transcripts import ASSISTANT_TAG, HUMAN_TAG

# The real HH-RLHF harmless test split lives in shared/, beside the checkout (never copied in).
HH_FILE = Path(os.environ.get(
    "RLENGINE_HH_FILE",
    Path(__file__).resolve().parents[1].parent / "shared" / "data"
    / "hh-rlhf-harmless-test.jsonl.gz"))
needs_hh = pytest.mark.skipif(not HH_FILE.is_file(), reason=f"no HH-RLHF file at {HH_FILE}")

PLAIN_ROWS = [
    {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5.", "margin": 1.5, "id": "a"},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven.", "margin": None,
     "id": "b"},
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No.", "margin": 0, "id": "c"},
]


def _expected_plain():
    return [(r["prompt"], r["chosen"], r["rejected"],
             None if r["margin"] is None else float(r["margin"]), {"id": r["id"]})
            for r in PLAIN_ROWS]


def _summary(pairs):
    return [(p.prompt, p.chosen, p.rejected, p.margin, p.extra) for p in pairs]


def _write_jsonl(path: Path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as file:
        for row in rows:
            file.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


# Each writer puts the rows somewhere and returns (source, name in Source, first row number).
WRITERS = {
    "jsonl": lambda tmp, rows: (_write_jsonl(tmp / "d.jsonl", rows), "d.jsonl", 1),
    "jsonl.gz": lambda tmp, rows: (_write_jsonl(tmp / "d.jsonl.gz", rows, gzip.open),
                                   "d.jsonl.gz", 1),
    "json list": lambda tmp, rows: (_write_text(tmp / "d.json", json.dumps(rows, indent=1)),
                                    "d.json", 1),
    "json data": lambda tmp, rows: (_write_text(tmp / "d.json", json.dumps({"data": rows})),
                                    "d.json", 1),
    "json lines as .json": lambda tmp, rows: (_to_json(tmp / "d.json", rows), "d.json", 1),
    "parquet": lambda tmp, rows: (_write_parquet(tmp / "d.parquet", rows), "d.parquet", 1),
    "save_to_disk": lambda tmp, rows: (_save_to_disk(tmp / "saved", rows), "saved", 0),
    "save_to_disk dict": lambda tmp, rows: (_save_dict_to_disk(tmp / "saved", rows),
                                            "saved[train]", 0),
    "Dataset": lambda tmp, rows: (datasets.Dataset.from_list(rows), "Dataset", 0),
    "DatasetDict": lambda tmp, rows: (datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows)}), "Dataset[train]", 0),
    "list": lambda tmp, rows: (list(rows), "rows", 0),
}


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _to_json(path: Path, rows) -> Path:
    datasets.Dataset.from_list(rows).to_json(str(path))  # JSON lines under a .json name
    return path


def _write_parquet(path: Path, rows) -> Path:
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def _save_to_disk(path: Path, rows) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _save_dict_to_disk(path: Path, rows) -> Path:
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_source_format_gives_the_same_pairs(tmp_path, kind):
    source, name, first = WRITERS[kind](tmp_path, PLAIN_ROWS)
    pairs = load_preferences(source)
    assert _summary(pairs) == _expected_plain()
    assert all(isinstance(p.margin, (float, type(None))) for p in pairs)
    assert [p.source.row for p in pairs] == [first, first + 1, first + 2]
    assert all(p.source.name.endswith(name) for p in pairs)


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "Dataset", "jsonl"])
def test_conversations_survive_arrow_round_trips(tmp_path, kind):
    # Arrow turns message dicts with different keys into structs with the union of the keys;
    # the loader must give back the messages as written.
    rows = [
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi", "name": "ann"}],
         "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": [{"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
    ]
    source, _, _ = WRITERS[kind](tmp_path, rows)
    pairs = load_preferences(source)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == \
        [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_field_mapping_and_extra_columns(tmp_path):
    rows = [{"question": "Q?", "good": "yes", "bad": "no", "strength": 0.25, "topic": "t",
             "gold": [1.0, 2.0]}]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    [pair] = load_preferences(path, prompt_field="question", chosen_field="good",
                              rejected_field="bad", margin_field="strength")
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin) == ("Q?", "yes", "no", 0.25)
    assert pair.extra == {"topic": "t", "gold": [1.0, 2.0]}
    assert pair.source == Source(str(path), 1)
    # the default field names do not match these columns
    with pytest.raises(DataFormatError, match="field 'chosen' is missing"):
        load_preferences(path)


def test_plain_pairs_without_prompt_are_scored_whole():
    [pair] = load_preferences([{"chosen": "A good summary.", "rejected": "A bad one."}])
    assert pair.prompt is None and pair.chosen == "A good summary."


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}
ASSISTANT_BAD = {"role": "assistant", "content": "What?"}


@pytest.mark.parametrize("row, prompt, chosen, rejected", [
    # TRL explicit prompt: the responses hold the assistant turns
    ({"prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT_BAD]},
     [USER], [ASSISTANT], [ASSISTANT_BAD]),
    # TRL implicit prompt: whole conversations sharing a prefix
    ({"chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT_BAD]},
     [USER], [ASSISTANT], [ASSISTANT_BAD]),
    # multi-turn, the last user turn shared
    ({"chosen": [USER, ASSISTANT, {"role": "user", "content": "More"}, ASSISTANT],
      "rejected": [USER, ASSISTANT, {"role": "user", "content": "More"}, ASSISTANT_BAD]},
     [USER, ASSISTANT, {"role": "user", "content": "More"}], [ASSISTANT], [ASSISTANT_BAD]),
    # explicit prompt repeated at the start of the responses: the copy is removed
    ({"prompt": [USER], "chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT_BAD]},
     [USER], [ASSISTANT], [ASSISTANT_BAD]),
    # a plain prompt with conversational responses: promoted to a user turn
    ({"prompt": "Hi", "chosen": [ASSISTANT], "rejected": [ASSISTANT_BAD]},
     [USER], [ASSISTANT], [ASSISTANT_BAD]),
    # plain responses with a conversational prompt: promoted to assistant turns
    ({"prompt": [USER], "chosen": "Hello!", "rejected": "What?"},
     [USER], [ASSISTANT], [ASSISTANT_BAD]),
    # several assistant turns as the response
    ({"prompt": [USER], "chosen": [ASSISTANT, ASSISTANT], "rejected": [ASSISTANT_BAD]},
     [USER], [ASSISTANT, ASSISTANT], [ASSISTANT_BAD]),
])
def test_conversational_formats(row, prompt, chosen, rejected):
    [pair] = load_preferences([row])
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, chosen, rejected)


def test_hh_split_on_made_up_transcripts():
    shared = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How do I X?\n\nAssistant:"
    rows = [
        {"chosen": shared + " Like this.", "rejected": shared + " No."},
        # the chosen response carries a turn tag of its own: the prompt is the shared part
        {"chosen": shared + " Sure.\n\nAssistant: And more.", "rejected": shared + " Nope."},
        # an empty chosen response (the transcript ends with the tag and a space)
        {"chosen": shared + " ", "rejected": shared + " Bad idea."},
    ]
    pairs = load_preferences(rows)
    assert [p.prompt for p in pairs] == [shared] * 3
    assert [p.chosen for p in pairs] == [" Like this.", " Sure.\n\nAssistant: And more.", " "]
    assert [p.rejected for p in pairs] == [" No.", " Nope.", " Bad idea."]
    assert load_prompts(rows)[1].prompt == shared
    assert split_hh_transcripts([shared + " A"]) == (shared, [" A"])


def _hh_rows(count=None):
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    return rows[:count] if count else rows


@needs_hh
def test_hh_split_on_200_real_pairs():
    rows = _hh_rows(200)
    pairs = load_preferences(HH_FILE, limit=200)
    assert len(pairs) == 200
    for row, pair in zip(rows, pairs):
        assert pair.prompt.endswith(ASSISTANT_TAG)
        assert pair.prompt.startswith(HUMAN_TAG)
        for response, transcript in ((pair.chosen, row["chosen"]),
                                     (pair.rejected, row["rejected"])):
            assert not response.startswith(ASSISTANT_TAG)
            assert HUMAN_TAG not in response
            assert pair.prompt + response == transcript
        assert pair.margin is None and pair.extra == {}
    assert [p.source for p in pairs] == [Source(str(HH_FILE), line) for line in range(1, 201)]
    # prompt-only loading of the same file gives the same prompts
    assert [p.prompt for p in load_prompts(HH_FILE, limit=200)] == [p.prompt for p in pairs]


@needs_hh
def test_hh_real_file_quirks_are_handled_and_counted():
    rows = _hh_rows()
    pairs = load_preferences(HH_FILE)
    assert len(pairs) == len(rows) == 2312
    # pairs in which a response holds a further "\n\nAssistant:" (the model wrote turn tags):
    # splitting each side at its own last tag would give the two sides different prompts
    diverging = [i + 1 for i, row in enumerate(rows)
                 if row["chosen"][:row["chosen"].rfind(ASSISTANT_TAG)]
                 != row["rejected"][:row["rejected"].rfind(ASSISTANT_TAG)]]
    assert diverging == [1255, 1689, 1951, 1953, 2037]
    for line in diverging:
        pair = pairs[line - 1]
        assert ASSISTANT_TAG in pair.chosen + pair.rejected
        assert pair.prompt + pair.chosen == rows[line - 1]["chosen"]
        assert pair.prompt + pair.rejected == rows[line - 1]["rejected"]
    # empty responses (only the space after the tag) are kept: the empty answer was preferred
    empty = [p.source.row for p in pairs if not p.chosen.strip() or not p.rejected.strip()]
    assert empty == [87, 517, 926, 1104]
    assert all(pairs[line - 1].chosen == " " for line in empty)
    for row, pair in zip(rows, pairs):
        assert pair.prompt + pair.chosen == row["chosen"]
        assert pair.prompt + pair.rejected == row["rejected"]
        assert pair.prompt.endswith(ASSISTANT_TAG)


def test_split_conversations_rules():
    assert split_conversations([[USER, ASSISTANT]]) == ([USER], [[ASSISTANT]])
    assert split_conversations([[USER, ASSISTANT, ASSISTANT_BAD]]) == \
        ([USER], [[ASSISTANT, ASSISTANT_BAD]])
    with pytest.raises(ValueError, match="does not end with an assistant"):
        split_conversations([[ASSISTANT, USER]])
    with pytest.raises(ValueError, match="prefix of another"):
        split_conversations([[USER, ASSISTANT], [USER, ASSISTANT]])


RANKED_ROWS = [
    {"prompt": "Pick a number.", "responses": [" 1", " 2", " 3"], "scores": [0.5, 2, -1],
     "note": "x"},
    {"prompt": [USER], "responses": [[ASSISTANT], [ASSISTANT_BAD]], "scores": [1.0, 0.0]},
]


@pytest.mark.parametrize("kind", ["jsonl", "json list", "parquet", "Dataset"])
def test_load_ranked_formats(tmp_path, kind):
    rows = RANKED_ROWS if kind not in ("parquet", "Dataset") else RANKED_ROWS[:1]
    source, _, _ = WRITERS[kind](tmp_path, rows)
    examples = load_ranked(source)
    assert examples[0].prompt == "Pick a number."
    assert examples[0].responses == [" 1", " 2", " 3"]
    assert examples[0].scores == [0.5, 2.0, -1.0]
    assert examples[0].extra == {"note": "x"}
    if len(rows) > 1:
        assert examples[1].prompt == [USER]
        assert examples[1].responses == [[ASSISTANT], [ASSISTANT_BAD]]


def test_load_ranked_splits_transcripts_without_prompt():
    shared = "\n\nHuman: Hi?\n\nAssistant:"
    [hh, conv] = load_ranked([
        {"responses": [shared + " A", shared + " B", shared + " C"], "scores": [3, 2, 1]},
        {"responses": [[USER, ASSISTANT], [USER, ASSISTANT_BAD]], "scores": [1, 0]},
    ])
    assert (hh.prompt, hh.responses) == (shared, [" A", " B", " C"])
    assert (conv.prompt, conv.responses) == ([USER], [[ASSISTANT], [ASSISTANT_BAD]])


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "save_to_disk", "Dataset"])
def test_load_prompts_formats(tmp_path, kind):
    rows = [{"prompt": "Tell me a joke.", "lang": "en"}, {"prompt": "Why?", "lang": "de"}]
    source, _, _ = WRITERS[kind](tmp_path, rows)
    prompts = load_prompts(source)
    assert [(p.prompt, p.extra) for p in prompts] == \
        [("Tell me a joke.", {"lang": "en"}), ("Why?", {"lang": "de"})]


def test_load_prompts_from_conversations_and_transcripts():
    shared = "\n\nHuman: Hi?\n\nAssistant:"
    prompts = load_prompts([
        {"prompt": [USER]},
        {"chosen": [USER, ASSISTANT]},                        # one conversation
        {"chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT_BAD]},
        {"chosen": shared + " A", "rejected": shared + " B", "id": 7},
        {"chosen": shared + " A"},                            # one HH transcript
    ])
    assert [p.prompt for p in prompts] == [[USER], [USER], [USER], shared, shared]
    assert prompts[3].extra == {"id": 7}


def test_limit_reads_no_further(tmp_path):
    path = _write_jsonl(tmp_path / "l.jsonl", PLAIN_ROWS[:2] + ["{not json"])
    assert len(load_preferences(path, limit=2)) == 2
    assert load_preferences(path, limit=0) == []
    with pytest.raises(DataFormatError):
        load_preferences(path, limit=3)
    with pytest.raises(ValueError, match="limit"):
        load_preferences(path, limit=-1)


def test_skip_mode_counts_bad_rows(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [PLAIN_ROWS[0], "{oops", {"chosen": "x"},
                                               PLAIN_ROWS[1]])
    with pytest.warns(SkippedRowsWarning, match=r"skipped 2 malformed row\(s\).*line 2"):
        pairs = load_preferences(path, on_error="skip")
    assert [p.source.row for p in pairs] == [1, 4]
    with pytest.raises(ValueError, match="on_error"):
        load_preferences(path, on_error="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_preferences(PLAIN_ROWS, on_error="skip")) == 3  # nothing to warn of


def test_split_selection(tmp_path):
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(PLAIN_ROWS),
                                 "test": datasets.Dataset.from_list(PLAIN_ROWS[:1])})
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]: pass split="):
        load_preferences(both)
    assert len(load_preferences(both, split="test")) == 1
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_preferences(both, split="dev")
    both.save_to_disk(str(tmp_path / "both"))
    pairs = load_preferences(tmp_path / "both", split="train")
    assert len(pairs) == 3 and pairs[0].source == Source(f"{tmp_path / 'both'}[train]", 0)
    path = _write_jsonl(tmp_path / "f.jsonl", PLAIN_ROWS)
    with pytest.raises(ValueError, match="split='train' applies to datasets"):
        load_preferences(path, split="train")


GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}
CONV = {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT_BAD]}

# (a bad jsonl line, the reason the error must give); the bad line is line 3 of its file
PREFERENCE_ERRORS = [
    ('{"prompt": "p", "chosen": "c"', r"invalid JSON: Expecting ',' delimiter \(column 30\)"),
    ('[1, 2]', "expected an object .*got list"),
    ({"prompt": "p", "rejected": "r"}, "field 'chosen' is missing; the row has 'prompt', 'rejected'"),
    ({**GOOD, "chosen": None}, "field 'chosen' is null"),
    ({**GOOD, "chosen": 3}, "field 'chosen' must be a string or a list of messages, got int"),
    ({"chosen": "c", "rejected": "  \n"}, r"field 'rejected' is empty text \(and there is no prompt"),
    ({**GOOD, "prompt": ""}, "field 'prompt' is empty text"),
    ({**GOOD, "chosen": []}, "field 'chosen' is an empty list of messages"),
    ({**GOOD, "margin": "1.0"}, "field 'margin' must be a number, got str '1.0'"),
    ({**GOOD, "margin": True}, "field 'margin' must be a number, got bool"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "margin": NaN}', "field 'margin' must be finite, got nan"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "margin": -Infinity}', "field 'margin' must be finite, got -inf"),
    ({**CONV, "chosen": ["hi"]}, "field 'chosen', message 1 must be a dict with 'role' and 'content', got str"),
    ({**CONV, "chosen": [{"role": "assistant"}]}, "field 'chosen', message 1 has no 'content' key"),
    ({**CONV, "prompt": [USER, {"role": 1, "content": "x"}]}, "field 'prompt', message 2: 'role' must be a string, got int"),
    ({**CONV, "chosen": [{"role": "assistant", "content": [{"type": "text"}]}]}, "field 'chosen', message 1: 'content' must be a string, got list"),
    ({**CONV, "chosen": [{"role": " ", "content": "x"}]}, "field 'chosen', message 1: 'role' is empty"),
    ({**CONV, "chosen": [USER, ASSISTANT], "prompt": [{"role": "system", "content": "s"}]}, "field 'chosen' must start with an assistant message, got role 'user'"),
    ({**CONV, "chosen": [USER]}, "field 'chosen' is the prompt conversation with no response"),
    ({"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "Yo"}, ASSISTANT]}, "the conversations first differ at message 1, a 'user' turn"),
    ({"chosen": "plain", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "no prompt field, and field 'rejected' holds an HH transcript but field 'chosen' does not"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "plain"}, "no prompt field, and field 'chosen' holds an HH transcript but field 'rejected' does not"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}, "the transcripts share no '\\\\n\\\\nAssistant:' turn"),
]


@pytest.mark.parametrize("bad, reason", PREFERENCE_ERRORS)
def test_preference_row_errors_name_file_line_and_reason(tmp_path, bad, reason):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataFormatError, match=rf"^{_escape(str(path))}, line 3: {reason}") as info:
        load_preferences(path)
    assert info.value.source == Source(str(path), 3)
    assert isinstance(info.value, ValueError)


def test_empty_response_after_a_prompt_is_kept(tmp_path):
    # an empty answer (a policy that stopped at once) is data, not a malformed row
    path = _write_jsonl(tmp_path / "empty.jsonl", [{**GOOD, "rejected": ""},
                                                    {**GOOD, "chosen": " "}])
    assert [(p.chosen, p.rejected) for p in load_preferences(path)] == [("c", ""), (" ", "r")]
    ranked = load_ranked([{**RANKED_GOOD, "responses": ["a", ""]}])
    assert ranked[0].responses == ["a", ""]


def _escape(text: str) -> str:
    import re
    return re.escape(text)


RANKED_GOOD = {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}
RANKED_ERRORS = [
    ({**RANKED_GOOD, "scores": [1]}, "2 responses but 1 scores"),
    ({**RANKED_GOOD, "scores": [1, float("inf")]}, "field 'scores', item 2 must be finite, got inf"),
    ({**RANKED_GOOD, "scores": [1, None]}, "field 'scores', item 2 must be a number, got NoneType"),
    ({**RANKED_GOOD, "responses": "a"}, "field 'responses' must be a list, got str"),
    ({**RANKED_GOOD, "responses": [], "scores": []}, "field 'responses' is an empty list"),
    ({"responses": ["a", "b"], "scores": [1, 0]}, "missing field 'prompt', and the texts are not HH"),
]


@pytest.mark.parametrize("bad, reason", RANKED_ERRORS)
def test_ranked_row_errors(tmp_path, bad, reason):
    path = tmp_path / "ranked.json"
    path.write_text(json.dumps([RANKED_GOOD, bad]))
    with pytest.raises(DataFormatError, match=rf"^{_escape(str(path))}, row 2: {reason}"):
        load_ranked(path)


def test_prompt_row_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"rows\[1\]: missing field 'prompt' \(and no "
                                              r"'chosen' transcript"):
        load_prompts([{"prompt": "ok"}, {"text": "x"}])
    with pytest.raises(DataFormatError, match=r"rows\[0\]: missing field 'prompt', and the texts"):
        load_prompts([{"chosen": "just text"}])
    with pytest.raises(DataFormatError, match="share no leading messages"):
        load_prompts([{"chosen": [ASSISTANT], "rejected": [ASSISTANT_BAD]}])


def test_errors_in_parquet_and_datasets_name_the_row(tmp_path):
    rows = [{**GOOD, "margin": None}, {**GOOD, "margin": float("nan")}]
    path = _write_parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(DataFormatError, match=rf"^{_escape(str(path))}, row 2: field 'margin' "
                                              "must be finite"):
        load_preferences(path)
    with pytest.raises(DataFormatError, match=r"^Dataset, index 1: field 'margin' must be finite"):
        load_preferences(datasets.Dataset.from_list(rows))


def test_whole_file_errors(tmp_path):
    bad_json = _write_text(tmp_path / "a.json", '[\n {"chosen": "c",\n  "rejected": }\n]')
    with pytest.raises(DataFormatError, match=r"a.json, line 3: invalid JSON: Expecting value"):
        load_preferences(bad_json)
    scalar = _write_text(tmp_path / "b.json", "3")
    with pytest.raises(DataFormatError, match=r'b.json: expected a JSON list of rows or an '
                                              r'object \{"data": \[...\]\}, got int'):
        load_preferences(scalar)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown data format"):
        load_preferences(_write_text(tmp_path / "c.csv", "a,b"))
    broken = tmp_path / "d.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"chosen": "c", "rejected": "r"}\n' * 50)[:40])
    with pytest.raises(DataFormatError, match=r"d.jsonl.gz, line 1: unreadable"):
        load_preferences(broken)
    with pytest.raises(DataFormatError, match="not a readable parquet file"):
        load_preferences(_write_text(tmp_path / "e.parquet", "not parquet"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_preferences(tmp_path / "folder")
    with pytest.raises(TypeError, match="source must be"):
        load_preferences(42)
    latin1 = tmp_path / "f.jsonl"
    latin1.write_bytes(b'{"chosen": "caf\xe9", "rejected": "r"}\n')
    with pytest.raises(DataFormatError, match=r"f.jsonl, line 1: unreadable \(UnicodeDecodeError"):
        load_preferences(latin1)


def test_pairs_are_preference_pairs_with_their_source(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", PLAIN_ROWS)
    pairs = load_preferences(path)
    assert all(isinstance(p, PreferencePair) for p in pairs)
    assert str(pairs[2].source) == f"{path}:3"


def test_samples_and_ranked_rows_keep_an_empty_response(tmp_path):
    # as pairs do: an empty answer is a real answer (a policy may stop at once)
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": "q", "responses": [" a", ""], "scores": [1, 0]}) + "\n")
    assert load_samples(path)[0].responses == [" a", ""]
    assert load_ranked(path)[0].responses == [" a", ""]
