"""Chat messages to token ids with the model's own chat template, prompt tokens masked from the loss.

Each conversation is cut into segments by rendering the template incrementally: the prompt up to an assistant turn
(``add_generation_prompt=True``, exactly what the model sees at inference) and the assistant turn itself (its
content and end-of-turn token). Segments are tokenized separately in one batch call of the fast tokenizer, so the
prompt's tokens are the ones inference produces and the turn boundaries are exact, as torchtune's own per-message
tokenization does.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from finetune.packed import IGNORE_INDEX
from finetune.stage import PermanentError
from tasks.pack.records import TEMPLATE_ERROR, BadRecord, Messages

Segment = tuple[str, bool]  # (text, is an assistant turn)


@dataclass
class Encoded:
    """Documents back to back: token ids, labels (-100 where not learned), and per-document counts."""

    tokens: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    prompt_tokens: np.ndarray
    """Tokens before the last assistant turn (the prompt a benchmark would send)."""
    response_tokens: np.ndarray
    """Tokens of the last assistant turn, its end-of-turn token included."""

    def take(self, documents: np.ndarray) -> Encoded:
        """The given documents (indices, in that order, repeats allowed)."""
        lengths = self.lengths[documents]
        starts = np.cumsum(self.lengths) - self.lengths
        # Each kept token's source index: its document's source start plus its offset inside the document.
        offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        gather = np.repeat(starts[documents], lengths) + offsets
        return Encoded(self.tokens[gather], self.labels[gather], lengths,
                       self.prompt_tokens[documents], self.response_tokens[documents])

    @staticmethod
    def concat(parts: list[Encoded]) -> Encoded:
        if not parts:
            empty = np.zeros(0, dtype=np.int32)
            return Encoded(empty, empty, np.zeros(0, dtype=np.int64), empty, empty)
        return Encoded(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                         ("tokens", "labels", "lengths", "prompt_tokens", "response_tokens")))


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tokenizer, "is_fast", False):
        raise PermanentError(f"{model_dir}: packing needs a fast tokenizer (tokenizer.json); "
                             f"found {type(tokenizer).__name__}")
    if not tokenizer.chat_template:
        raise PermanentError(f"{model_dir}: the tokenizer has no chat_template (tokenizer_config.json)")
    return tokenizer


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id; its EOS where it has none (pads are masked from attention and loss either way)."""
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if value is None:
        raise PermanentError("the tokenizer has neither a pad nor an eos token to pad packs with")
    return int(value)


class ChatEncoder:
    def __init__(self, tokenizer: Any, train_on_input: bool):
        self.tokenizer = tokenizer
        self.train_on_input = train_on_input

    def _render(self, messages: Messages, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # templates reject records with raise_exception(...), e.g. roles out of order
            raise BadRecord(TEMPLATE_ERROR, f"the chat template rejects this conversation: {exc}") from None

    def segments(self, messages: Messages, location: str) -> list[Segment]:
        segments: list[Segment] = []
        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], generation_prompt=True)
            turn = self._render(messages[: index + 1], generation_prompt=False)
            if not (prompt.startswith(done) and turn.startswith(prompt)):
                raise PermanentError(
                    f"{location}: the model's chat template renders the conversation differently once it goes on, "
                    "so assistant turns cannot be located for loss masking"
                )
            segments += [(prompt[len(done):], False), (turn[len(prompt):], True)]
            done = turn
        if messages[-1]["role"] != "assistant":
            full = self._render(messages, generation_prompt=False)
            segments.append((full[len(done):], False))
        return [s for s in segments if s[0]]

    def encode(self, conversations: list[list[Segment]]) -> Encoded:
        """Tokenize many conversations' segments in one batch call."""
        if not conversations:
            return Encoded.concat([])
        texts = [text for segments in conversations for text, _ in segments]
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        segment_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(segment_lengths.sum()))
        learned = np.fromiter((turn for segments in conversations for _, turn in segments), dtype=bool,
                              count=len(texts))
        counts = np.fromiter(map(len, conversations), dtype=np.int64, count=len(conversations))
        first_segment = np.cumsum(counts) - counts
        # Index of each conversation's last assistant segment (every conversation has one).
        last_turn = np.array([start + max(i for i, (_, turn) in enumerate(segs) if turn)
                              for start, segs in zip(first_segment.tolist(), conversations)], dtype=np.int64)
        segment_start = np.cumsum(segment_lengths) - segment_lengths
        lengths = np.add.reduceat(segment_lengths, first_segment)
        doc_start = segment_start[first_segment]
        mask = np.ones(tokens.size, dtype=bool) if self.train_on_input else np.repeat(learned, segment_lengths)
        return Encoded(
            tokens=tokens,
            labels=np.where(mask, tokens, IGNORE_INDEX).astype(np.int32),
            lengths=lengths,
            prompt_tokens=(segment_start[last_turn] - doc_start).astype(np.int32),
            response_tokens=segment_lengths[last_turn].astype(np.int32),
        )
