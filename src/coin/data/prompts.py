"""The prompt format and its tokenisation: the one definition shared by training, evaluation and predict.

Training format (CoIN reference)::

    "{instruction + input}\\n\\n### Response:\\n{target}"

Loss and scores apply to the response tokens only. The reference *evaluates* with a different format,
``instruction + content + "### Response:"`` (no newlines); ``fmt="reference"`` reproduces it.

>>> format_prompt("Is it good?\\nGreat film", "train")
'Is it good?\\nGreat film\\n\\n### Response:\\n'
>>> format_prompt("Is it good? Great film", "reference")
'Is it good? Great film### Response:'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PromptFormat = Literal["train", "reference"]

RESPONSE_MARKER = {"train": "\n\n### Response:\n", "reference": "### Response:"}


def format_prompt(prompt: str, fmt: PromptFormat = "train") -> str:
    return prompt + RESPONSE_MARKER[fmt]


def _past_marker(head: list[int], whole: list[int]) -> list[int] | None:
    """The ids of marker + response past the marker's own ``head``; None where the marker's tokens changed with
    what follows (the response is then tokenised alone)."""
    whole = list(whole)
    return whole[len(head):] if whole[:len(head)] == list(head) and len(whole) > len(head) else None


def response_lengths(tokenizer, responses: list[str], fmt: PromptFormat = "train") -> dict[str, int]:
    """Token count of each distinct response as :func:`response_ids` tokenises it, in one batch call."""
    uniq = sorted({r for r in responses if r})
    if not uniq:
        return {}
    marker = RESPONSE_MARKER[fmt]
    head = tokenizer(marker, add_special_tokens=False)["input_ids"]
    whole = tokenizer([marker + r for r in uniq], add_special_tokens=False)["input_ids"]
    out = {r: len(past) for r, ids in zip(uniq, whole, strict=True) if (past := _past_marker(head, ids)) is not None}
    rest = [r for r in uniq if r not in out]
    if rest:
        out.update({r: len(ids) for r, ids in zip(rest, tokenizer(rest, add_special_tokens=False)["input_ids"],
                                                  strict=True)})
    return out


def response_ids(tokenizer, response: str, fmt: PromptFormat = "train") -> list[int]:
    """Token ids of ``response`` as this tokenizer writes it after the answer marker: the tokens of marker +
    response past the marker's own (lm-evaluation-harness's split of the joined text). Tokenised alone, a
    SentencePiece tokenizer that marks a word's leading space (Llama 1/2, Mistral) gave '▁positive', a token it never
    writes after the marker's newline, where it writes 'positive'. WordPiece (MiniLM) gives the same ids either way;
    byte-level BPE (GPT-2, Qwen2, Llama 3) too after the training marker, and after the reference marker's ':' it
    splits a leading contraction as the joined text does ("'s" as "'", "s"). Where the marker's tokens change with
    what follows, the response is tokenised alone, as before. (An adapter trained before this rule on a
    leading-space tokenizer learned the '▁' tokens: retrain it.)"""
    if not response:
        return []
    marker = RESPONSE_MARKER[fmt]
    head = tokenizer(marker, add_special_tokens=False)["input_ids"]
    past = _past_marker(head, tokenizer(marker + response, add_special_tokens=False)["input_ids"])
    return past if past is not None else list(tokenizer(response, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    n_prompt: int        # tokens before the response (BOS + prompt + marker); labels are -100 there
    truncated: int       # prompt tokens dropped from the left to fit max_length (0 normally)

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def encode(
    tokenizer,
    prompt: str,
    response: str,
    *,
    fmt: PromptFormat = "train",
    append_eos: bool = True,
    max_length: int | None = None,
) -> Encoded:
    """``[BOS] prompt+marker | response [EOS]`` as token ids, with the prompt/response boundary.

    Prompt and response are tokenised separately so the boundary is exact for any tokenizer (BERT
    WordPiece, GPT-2 BPE, SentencePiece); the response as the tokenizer writes it after the marker
    (:func:`response_ids`). Over-long rows lose prompt tokens from the left (after BOS),
    never response tokens: a response that loses its tokens would silently train on nothing.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p_ids = tokenizer(format_prompt(prompt, fmt), add_special_tokens=False)["input_ids"]
    r_ids = response_ids(tokenizer, response, fmt)
    if append_eos and tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    truncated = 0
    if max_length is not None and len(bos) + len(p_ids) + len(r_ids) > max_length:
        keep = max(max_length - len(bos) - len(r_ids), 1)
        truncated = len(p_ids) - keep
        p_ids = p_ids[-keep:]
    ids = bos + p_ids + r_ids
    return Encoded(ids, len(bos) + len(p_ids), truncated)
