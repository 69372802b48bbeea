"""Splitting full transcripts into the prompt they share and the responses that follow it.

Two kinds of transcript carry their prompt inside the responses:

* HH-RLHF text: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is everything up to and
  including the last ``"\\n\\nAssistant:"`` that all the transcripts share; the responses are
  the rest (they keep their leading space, so prompt + response is the transcript, exactly).
  Splitting each transcript at its own last tag instead goes wrong on real data: in the
  HH-RLHF harmless test split, 5 of 2,312 pairs have a response in which the model itself wrote
  a further ``"\\n\\nAssistant:"``, which would give the two sides different prompts.
* Conversations (lists of ``{"role", "content"}`` messages, TRL's "implicit prompt" format): the
  prompt is the longest run of messages all the conversations start with; each response is
  what follows and must begin with an assistant turn.

The functions raise ValueError with a plain reason; the loaders add the file and row."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rlengine.data.types import Message

HUMAN_TAG = "\n\nHuman:"
ASSISTANT_TAG = "\n\nAssistant:"


def is_hh_transcript(text: object) -> bool:
    """True for HH-RLHF style text: an assistant turn, and a human turn before it."""
    if not isinstance(text, str) or ASSISTANT_TAG not in text:
        return False
    return HUMAN_TAG in text or text.lstrip().startswith("Human:")


def split_hh_transcripts(transcripts: Sequence[str]) -> tuple[str, list[str]]:
    """(prompt, responses): the prompt ends with the last ``"\\n\\nAssistant:"`` all the
    transcripts share (for one transcript, its own last one); ``prompt + responses[i] ==
    transcripts[i]``. A response may be empty or whitespace (the real data has such turns)."""
    if not transcripts:
        raise ValueError("no transcripts to split")
    shared = transcripts[0] if len(transcripts) == 1 else os.path.commonprefix(list(transcripts))
    end = shared.rfind(ASSISTANT_TAG)
    if end < 0:
        if len(transcripts) == 1:
            raise ValueError(f"the transcript has no {ASSISTANT_TAG!r} turn to split off")
        raise ValueError(f"the transcripts share no {ASSISTANT_TAG!r} turn, so there is no "
                         "common prompt to split off (they differ from the start of the "
                         "first assistant turn on)")
    end += len(ASSISTANT_TAG)
    return transcripts[0][:end], [text[end:] for text in transcripts]


def split_conversations(
        conversations: Sequence[list[Message]]) -> tuple[list[Message], list[list[Message]]]:
    """(prompt messages, response messages): the prompt is the longest common run of leading
    messages (for one conversation, everything before its final run of assistant messages).
    Every response must be non-empty and start with an assistant message."""
    if not conversations:
        raise ValueError("no conversations to split")
    if len(conversations) == 1:
        messages = conversations[0]
        start = len(messages)
        while start > 0 and messages[start - 1].get("role") == "assistant":
            start -= 1
        if start == len(messages):
            raise ValueError("the conversation does not end with an assistant message, so it "
                             "has no response to split off")
        return list(messages[:start]), [list(messages[start:])]
    shared = 0
    shortest = min(len(messages) for messages in conversations)
    while shared < shortest and all(messages[shared] == conversations[0][shared]
                                    for messages in conversations[1:]):
        shared += 1
    responses = [list(messages[shared:]) for messages in conversations]
    for messages in responses:
        if not messages:
            raise ValueError("one conversation is a prefix of another (or they are identical), "
                             "so it has no response of its own")
        if messages[0].get("role") != "assistant":
            raise ValueError(
                f"the conversations first differ at message {shared + 1}, a "
                f"{messages[0].get('role')!r} turn; they must share everything before the "
                "responses, which start with an assistant turn")
    return list(conversations[0][:shared]), responses
