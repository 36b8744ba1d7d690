"""Generation scoring: greedy decoding of a few tokens, parsed into a label as the reference does.

``generate_answers`` is the batched path: prompts are tokenised exactly like training/scoring
(``coin.data.prompts.encode``: BOS + prompt + response marker), LEFT-padded, and decoded greedily
with ``model.generate`` (KV cache on; position ids follow the attention mask, so a left-padded row
decodes as it would alone). A prefix-LM backbone (``model.attention: prefix``) or the ``mean`` readout
decodes with our own greedy loop instead: the prompt runs once with every prompt token seeing every other, then each new
token runs causally on the KV cache (right padding, per-row positions, as the loglik scorer does);
``model.generate`` knows only the causal mask. ``generate_reference_style`` is the reference's loop (batch size 1, no KV
cache, full-vocabulary logits at every position) kept for the benchmark and as a test oracle.

``parse_answer`` maps a decoded output to a label index (docs/protocol.md#scoring):

1. only the *new* tokens are decoded (the reference splits the full text on the prompt, which raises
   when detokenisation does not reproduce the prompt);
2. lower-case, strip whitespace and punctuation at both ends (as the reference does);
3. spaces around ``_`` are removed: WordPiece decodes the tokens of ``not_entailment`` as
   ``"not _ entailment"``; a model that wrote ``not entailment`` (no underscore) is still wrong;
4. the answer is the label whose word the text *starts with*; candidates are tried longest first, so a
   label that is a prefix of another can never shadow it (``entailment`` vs ``not_entailment`` and
   ``equivalent`` vs ``not_equivalent`` cannot collide either way with ``startswith``);
5. no match, or an empty output, is ``-1`` (always wrong).

The reference also accepts the aliases of its ``LABEL_SET`` (``'0'``/``'1'`` for sst2, qnli, rte,
wnli); :func:`label_choices` reads them from the instruction file when it has them.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coin.data.io import DataError, read_json
from coin.data.prompts import PromptFormat, encode
from coin.evaluation.scoring import length_batches
from coin.modeling.backbone import (
    attention_mode,
    readout_mode,
    reads_prompt_whole,
    row_attention_mask,
    selected_logits,
)
from coin.progress import bar

log = logging.getLogger(__name__)

UNPARSED = -1
_STRIP = string.whitespace + string.punctuation
_UNDERSCORE_SPACES = re.compile(r"\s*_\s*")
_SIGNED_NUMBER = re.compile(r"\s*[-+\u2212]\s*\d")
_NOT_A_SIGN = _STRIP.replace("-", "").replace("+", "")  # what may come before a sign: '(-1)', '"-1"' are signed too
# "10", "1.5" (WordPiece decodes it "1. 5"), "1st", "1/2" ("1 / 2"), a range "1-2" / "1 – 2", a ratio "1:1", "1 2",
# "1%"; any other letter or digit ("1½", "1²") below. The slashes: /, the fraction and division slashes; the dashes:
# hyphen, its Unicode forms, the en and em dash and the minus sign
_NUMBER_GOES_ON = re.compile(r"\d|[.,]\s?\d|\s?[/\u2044\u2215]\s?\d|\s*[-\u2010-\u2014\u2212:]\s*\d|\s+\d|\s*%|[a-z]")


# --------------------------------------------------------------------------- parsing


def normalise_output(text: str) -> str:
    """Lower-case, undo WordPiece's spaces around ``_``, strip whitespace/punctuation at both ends."""
    return _UNDERSCORE_SPACES.sub("_", text.lower()).strip(_STRIP)


def parse_answer(text: str, choices: Mapping[str, int]) -> int:
    """Label index of the first choice ``text`` starts with (longest choice first), else ``-1``.

    >>> choices = {"entailment": 0, "not_entailment": 1}
    >>> parse_answer("Not_entailment.", choices), parse_answer("entailment, because", choices)
    (1, 0)
    >>> parse_answer("not entailment", choices), parse_answer("", choices), parse_answer("the answer", choices)
    (-1, -1, -1)
    >>> digits = {"0": 0, "1": 1}
    >>> [parse_answer(t, digits) for t in ("1.", "10", "1.5 stars", "-1", "(-1)", "'-1'", "1 / 2", "1½", "(1)")]
    [1, -1, -1, -1, -1, -1, -1, -1, 1]
    >>> [parse_answer(t, digits) for t in ("1-2", "0 – 1", "1:1", "1 2", "1%", "1 - yes", "1: positive", "1, because")]
    [-1, -1, -1, -1, -1, 1, 1, 1]
    """
    norm = normalise_output(text)
    # "-1": the sign is no punctuation to strip before a digit alias, also inside quotes or brackets ('(-1)')
    if not norm or _SIGNED_NUMBER.match(text.lower().lstrip(_NOT_A_SIGN)):
        return UNPARSED
    raw = _UNDERSCORE_SPACES.sub("_", text.lower()).lstrip(_STRIP)  # its end kept: "1%" is no whole number
    for word in sorted(choices, key=len, reverse=True):
        w = normalise_output(word)
        # a digit alias ("0", "1") names a label only as a whole number: "10", "1.5 stars", "1st", "1/2", "1½",
        # "1-2", "1:1", "1%" and "1728 ..." do not
        goes_on = w[-1:].isdigit() and (_NUMBER_GOES_ON.match(norm, len(w)) or norm[len(w):len(w) + 1].isalnum()
                                        or (raw.startswith(w) and _NUMBER_GOES_ON.match(raw, len(w))))
        if norm.startswith(w) and not goes_on:
            return int(choices[word])
    return UNPARSED


def label_choices(label_words: Sequence[str], instruction_file: str | Path | None = None,
                  task: str | None = None) -> dict[str, int]:
    """``{answer string: label index}``: the task's label words plus the file's aliases, if any.

    An instruction file in the CoIN/PromptBench schema may carry ``label_set`` (the strings the
    reference accepts) and ``label_to_id``; a mapping that contradicts our label ids is rejected with
    the file and field named, because it would silently flip answers (wnli's ids are reversed).
    """
    choices = {w: i for i, w in enumerate(label_words)}
    if instruction_file is None or task is None:
        return choices
    path = Path(instruction_file)
    doc = read_json(path)
    label_set, to_id = _get(doc, "label_set", task), _get(doc, "label_to_id", task)
    if label_set is None and to_id is None:
        return choices
    if label_set is None or to_id is None:  # one without the other would be ignored, aliases and all
        have, lacks = ("label_to_id", "label_set") if label_set is None else ("label_set", "label_to_id")
        raise DataError(f"{path}: task '{task}': field '{have}.{task}' is given but '{lacks}.{task}' is not; the "
                        "aliases need both (the answer strings, and the label id of each): add it, or drop both")
    if not isinstance(label_set, list) or not isinstance(to_id, dict):
        raise DataError(f"{path}: task '{task}': fields 'label_set.{task}' / 'label_to_id.{task}' should be a "
                        f"list and an object")
    for word, idx in choices.items():
        if word in to_id and to_id[word] != idx:
            raise DataError(f"{path}: task '{task}': field 'label_to_id.{task}.{word}' = {to_id[word]!r} but "
                            f"'{word}' is label {idx} in the data (coin.data.tasks); fix the file")
    # an alias of label_set without an id in label_to_id is not an answer: the reference's own file lists such
    # variants ("positive'") and maps only some of them
    # answers are matched after normalise_output (case, spaces, punctuation at the ends): an alias is refused where
    # it reads as another label's word ("Positive" -> 0 would turn every "positive" into label 0) or as nothing
    # (every answer starts with "", so no output would stay unparsed)
    taken = {normalise_output(w): i for w, i in choices.items()}
    for alias in label_set:
        if isinstance(alias, str) and alias in to_id and alias not in choices:
            idx = to_id[alias]
            field = f"{path}: task '{task}': field 'label_to_id.{task}.{alias}'"
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(label_words):
                raise DataError(f"{field} = {idx!r} is not a label index 0..{len(label_words) - 1}")
            key = normalise_output(alias)
            if not key:
                raise DataError(f"{field}: the alias {alias!r} reads as nothing once case, spaces and punctuation "
                                f"are set aside, so every answer would count as label {idx}; drop it")
            if taken.get(key, idx) != idx:
                raise DataError(f"{field} = {idx} but answers are matched case- and punctuation-blind, and "
                                f"{alias!r} reads as {key!r}, which is label {taken[key]}: it would flip those "
                                "answers; fix the id or drop the alias")
            taken[key] = idx
            choices[alias] = idx
    return choices


def _get(doc: Any, key: str, task: str) -> Any:
    section = doc.get(key) if isinstance(doc, dict) else None
    return section.get(task) if isinstance(section, dict) else None


# --------------------------------------------------------------------------- decoding


@dataclass(kw_only=True)
class GenerateOutput:
    texts: list[str]            # decoded new tokens per prompt (special tokens removed)
    new_tokens: int             # tokens generated in total (all rows, before EOS/padding)
    prompt_tokens: int          # prompt tokens in total


def _prompt_ids(tokenizer, prompts: Sequence[str], fmt: PromptFormat, max_length: int | None) -> list[list[int]]:
    ids = [encode(tokenizer, p, "", fmt=fmt, append_eos=False, max_length=max_length) for p in prompts]
    cut = sum(e.truncated > 0 for e in ids)
    if cut:
        log.warning("%d of %d prompts lost tokens from the left to fit %s tokens", cut, len(ids), max_length)
    return [e.input_ids for e in ids]


@contextmanager
def _neutral_generation_config(model: nn.Module) -> Iterator[None]:
    """Hold a default ``GenerationConfig`` on the model for the block. transformers fills every key that the config
    passed to ``generate`` leaves unset from the model's own (the checkpoint's ``generation_config.json``):
    ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``suppress_tokens``, ... would change
    "greedy" answers (Qwen2.5-Instruct ships ``repetition_penalty: 1.05``)."""
    from transformers import GenerationConfig

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(hf, "generation_config", None)
    if saved is None:
        yield
        return
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


class _UnpaddedBatchWarning(logging.Filter):
    """Drops transformers' "We strongly recommend passing in an `attention_mask` since your input_ids may be padded"
    for ``generate`` here. The mask is always passed; ``generate`` drops it when a batch has no padding, and the
    forward then guesses from the first token: for GPT-2-style tokenizers (pad = BOS = EOS) that token is BOS, and
    the warning told the user the answers might be wrong when they were not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("We strongly recommend passing in an `attention_mask`")


@contextmanager
def _no_unpadded_batch_warning() -> Iterator[None]:
    logger, only = logging.getLogger("transformers.modeling_utils"), _UnpaddedBatchWarning()
    logger.addFilter(only)
    try:
        yield
    finally:
        logger.removeFilter(only)


def _gen_config(tokenizer, max_new_tokens: int):
    """Greedy decoding, overriding whatever sampling defaults the checkpoint's generation_config has (with
    :func:`_neutral_generation_config`: the keys this config leaves unset as well)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)


def _budget(model: nn.Module, max_new_tokens: int) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return None if n is None else n - max_new_tokens


def _decode_new(tokenizer, out: torch.Tensor, width: int) -> tuple[list[str], int]:
    """Decoded new tokens per row (up to the first EOS) and how many tokens that was."""
    texts, n = [], 0
    eos = tokenizer.eos_token_id
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        n += len(row)
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts, n


def generate_answers(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, fmt: PromptFormat = "train", max_new_tokens: int = 7,
    batch_size: int = 32, desc: str = "generate", blocks: Sequence[Hashable] | None = None,
) -> GenerateOutput:
    """Greedy ``max_new_tokens`` continuations of every prompt, batched with left padding and a KV cache
    (:func:`coin.evaluation.scoring.length_batches`; ``blocks``: one key per prompt, no batch spans two)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    ids = _prompt_ids(tokenizer, prompts, fmt, _budget(model, max_new_tokens))
    batches = length_batches(list(map(len, ids)), batch_size, blocks)
    from coin.evaluation.scoring import offsets_positions

    # model.generate numbers positions from 0; a model that numbers its own from an offset (RoBERTa) decodes with
    # the project's loop, which leaves them to the model
    if reads_prompt_whole(model) or offsets_positions(model):
        return _generate_prefix_lm(model, tokenizer, ids, batches, max_new_tokens=max_new_tokens, desc=desc)
    cfg = _gen_config(tokenizer, max_new_tokens)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    texts: list[str] = [""] * len(ids)
    new_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _neutral_generation_config(model), _no_unpadded_batch_warning():
            for idx in bar(batches, desc=desc, unit="batch", leave=False, show=len(batches) > 1):
                width = max(len(ids[i]) for i in idx)
                x = torch.full((len(idx), width), pad, dtype=torch.long)
                m = torch.zeros((len(idx), width), dtype=torch.long)
                for b, i in enumerate(idx):  # LEFT padding: every row's last prompt token is at width - 1
                    x[b, width - len(ids[i]):] = torch.tensor(ids[i])
                    m[b, width - len(ids[i]):] = 1
                out = model.generate(input_ids=x.to(device), attention_mask=m.to(device), generation_config=cfg)
                decoded, n = _decode_new(tokenizer, out.cpu(), width)
                new_tokens += n
                for b, i in enumerate(idx):
                    texts[i] = decoded[b]
    finally:
        model.train(was_training)
    return GenerateOutput(texts=texts, new_tokens=new_tokens, prompt_tokens=sum(map(len, ids)))


def _greedy_rows(model: nn.Module, prompt_ids: list[list[int]], max_new_tokens: int, eos: int | None,
                 pad: int) -> list[list[int]]:
    """Greedy new tokens (up to EOS, excluded) of each prompt under the model's attention and readout,
    KV-cached.

    Falls back to re-running the whole sequence per token (4D prefix mask, no cache) where the model has
    no shareable cache (:func:`coin.evaluation.scoring.cache_support`).
    """
    from coin.evaluation.scoring import _CachedLM, cache_support

    device = next(model.parameters()).device
    n = len(prompt_ids)
    new: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    if cache_support(model) is None:
        lm = _CachedLM.of(model, pad)
        head = lm.head
        prefix = attention_mode(model) == "prefix"
        hidden, state = lm.extend(None, None, prompt_ids, bidirectional=prefix)
        lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
        if readout_mode(model) == "mean":  # the first new token reads the mean of the prompt's states
            real = torch.arange(hidden.size(1), device=device).unsqueeze(0) < lengths.unsqueeze(1)   # (n, T)
            last = ((hidden.float() * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True)).to(hidden.dtype)
        else:
            last = hidden[torch.arange(n, device=device), lengths - 1]
        for step in range(max_new_tokens):
            nxt = head(last).argmax(dim=-1).tolist()                                   # (n,)
            for i, t in enumerate(nxt):
                if not done[i]:
                    if t == eos:
                        done[i] = True
                    else:
                        new[i].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            step = [[t if not d else pad] for t, d in zip(nxt, done, strict=True)]
            hidden, state = lm.extend(state, torch.arange(n, device=device), step)
            last = hidden[:, 0]
        return new
    seqs = [list(p) for p in prompt_ids]
    for _ in range(max_new_tokens):
        live = [i for i in range(n) if not done[i]]
        if not live:
            break
        width = max(len(seqs[i]) for i in live)
        x = torch.full((len(live), width), pad, dtype=torch.long)
        m = torch.zeros((len(live), width), dtype=torch.long)
        for b, i in enumerate(live):
            x[b, :len(seqs[i])] = torch.tensor(seqs[i])
            m[b, :len(seqs[i])] = 1
        x, m = x.to(device), m.to(device)
        n_prompt = torch.tensor([len(prompt_ids[i]) for i in live], device=device)
        prefix = attention_mode(model) == "prefix"
        mask = row_attention_mask(m, n_prompt if prefix else None, model, next(model.parameters()).dtype)
        rows = torch.arange(len(live), device=device)
        cols = torch.tensor([len(seqs[i]) - 1 for i in live], device=device)
        prompt = torch.arange(width, device=device).unsqueeze(0) < n_prompt.unsqueeze(1)          # (B, T)
        _, logits = selected_logits(model, x, mask, rows, cols, prompt=prompt)
        for b, i in enumerate(live):
            t = int(logits[b].argmax())
            if t == eos:
                done[i] = True
            else:
                new[i].append(t)
                seqs[i].append(t)
    return new


def _generate_prefix_lm(model: nn.Module, tokenizer, ids: list[list[int]], batches: list[list[int]], *,
                        max_new_tokens: int, desc: str) -> GenerateOutput:
    """:func:`generate_answers` for a prefix-LM backbone (module docstring)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    texts: list[str] = [""] * len(ids)
    new_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _neutral_generation_config(model):
            for idx in bar(batches, desc=desc, unit="batch", leave=False, show=len(batches) > 1):
                rows = _greedy_rows(model, [ids[i] for i in idx], max_new_tokens, tokenizer.eos_token_id, pad)
                for i, row in zip(idx, rows, strict=True):
                    new_tokens += len(row)
                    texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return GenerateOutput(texts=texts, new_tokens=new_tokens, prompt_tokens=sum(map(len, ids)))


def generate_reference_style(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, fmt: PromptFormat = "train", max_new_tokens: int = 7,
    desc: str = "generate (reference loop)",
) -> GenerateOutput:
    """The reference's decoding loop: one prompt at a time, greedy, **no KV cache** (each new token
    re-runs the whole sequence and the LM head over every position), stopping at EOS. A plain decoder's loop:
    a model loaded as a prefix LM or with the mean readout is refused (compare against it loaded
    ``attention='causal', readout='last'``), since this loop would decode another model than
    :func:`generate_answers` does."""
    if reads_prompt_whole(model):
        raise ValueError(f"the reference loop decodes a plain causal LM; this model reads with attention = "
                         f"{attention_mode(model)!r}, readout = {readout_mode(model)!r}: load it with "
                         "attention='causal', readout='last' to compare")
    device = next(model.parameters()).device
    ids = _prompt_ids(tokenizer, prompts, fmt, _budget(model, max_new_tokens))
    eos = tokenizer.eos_token_id
    texts, new_tokens = [], 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for p in bar(ids, desc=desc, unit="prompt", leave=False, show=len(ids) > 1):
                x = torch.tensor([p], device=device)
                new: list[int] = []
                for _ in range(max_new_tokens):
                    logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits  # (1, T, V)
                    nxt = int(logits[0, -1].argmax())
                    if nxt == eos:
                        break
                    new.append(nxt)
                    x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
                new_tokens += len(new)
                texts.append(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return GenerateOutput(texts=texts, new_tokens=new_tokens, prompt_tokens=sum(map(len, ids)))
