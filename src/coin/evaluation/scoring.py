"""Log-likelihood scoring of label words (the lm-evaluation-harness way of scoring multiple choice).

For a prompt ``p`` and label word ``w`` the score is ``sum_t log P(w_t | p, w_<t)`` over the tokens of
``w`` as the continuation of the formatted prompt (``coin.data.prompts.encode``, no EOS), optionally
divided by the number of label tokens (``length_normalise``).

Two execution paths give the same numbers (tests pin both against a full-vocabulary hand computation):

``kv-cache`` (default where the backbone allows it): *one* forward pass per (instruction, example)::

    prompt tokens          [BOS p_1 ... p_n]          -> hidden at p_n -> log P(w_1) for every label w
    label continuations    [w_1 ... w_{k-1}] per label, reusing the prompt's KV cache
                           (rows repeat their prompt's cache; only labels of >= 2 tokens need this)

  With ``groups`` (one group per instruction), the group's longest common *token* prefix (the
  instruction, tokenised as it is inside every prompt, so the prefix is clean by construction) is run
  once and its KV cache is shared by every example of the group.

``per-label`` (fallback): one right-padded sequence per (prompt, label word); used when the model
returns no reusable ``DynamicCache`` (e.g. sliding-window layers) or has no separable LM head. The
reason is reported in :attr:`LoglikOutput.path_note`.

In both paths the LM head runs only at the positions that predict a label token.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from coin.data.prompts import PromptFormat, encode, response_ids
from coin.modeling.backbone import (
    attention_mode,
    bidirectional_mask,
    readout_mode,
    reads_prompt_whole,
    row_attention_mask,
    selected_logits,
    split_body_head,
)
from coin.progress import bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredSequence:
    input_ids: list[int]
    n_prompt: int  # label tokens are input_ids[n_prompt:]


@dataclass(kw_only=True)
class LoglikOutput:
    scores: torch.Tensor                 # (n_prompts, n_labels) float32, summed (or per-token) log-probs
    path: str                            # "kv-cache" | "per-label"
    path_note: str = ""                  # why the fallback was taken, if it was
    prefix_tokens: float = 0.0           # mean shared-prefix length per prompt (0 = no prefix sharing)
    forward_tokens: int = 0              # tokens run through the transformer body (honest work count)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- shared helpers


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def label_token_ids(tokenizer, label_words: Sequence[str], fmt: PromptFormat = "train") -> list[list[int]]:
    """Token ids of each label word as a response (no BOS/EOS), exactly as :func:`encode` tokenises it after the
    ``fmt`` answer marker (:func:`coin.data.prompts.response_ids`). Two words
    this tokenizer reads as the same ids (an uncased tokenizer's 'Yes' and 'yes', words it maps to its unknown
    token) are refused: they would score alike, and the first listed would win every tie."""
    out = []
    for word in label_words:
        ids = response_ids(tokenizer, word, fmt)
        if not ids:
            raise ValueError(f"label word {word!r} tokenises to nothing; it cannot be scored")
        out.append(list(ids))
    seen: dict[tuple[int, ...], str] = {}
    for word, ids in zip(label_words, out, strict=True):
        first = seen.setdefault(tuple(ids), word)
        if first != word:
            raise ValueError(f"{first!r} and {word!r} are the same tokens {ids} to this model's tokenizer (it ignores "
                             "case or accents, or cannot encode them), so the model cannot choose between them; "
                             f"answers scored on them would always be {first!r}")
    return out


# --------------------------------------------------------------------------- per-label path


def build_sequences(
    tokenizer, prompts: list[str], label_words: list[str], *, fmt: PromptFormat, max_length: int | None = None
) -> list[ScoredSequence]:
    """One sequence per (prompt, label word), prompt-major: index ``i * len(label_words) + j``.

    A prompt too long for ``max_length`` is cut once for all its labels, to leave room for the longest (as the
    kv-cache path cuts it): cut per label, a shorter label word was scored after more of the prompt than a longer
    one, and the two paths disagreed."""
    seqs: list[ScoredSequence] = []
    truncated = 0
    # the answer is tokenised on its own, so its length does not depend on the prompt
    lengths = [encode(tokenizer, "", w, fmt=fmt, append_eos=False).n_response for w in label_words]
    for prompt in prompts:
        for word, n in zip(label_words, lengths, strict=True):
            room = None if max_length is None else max_length - max(lengths) + n  # the same prompt budget for each
            enc = encode(tokenizer, prompt, word, fmt=fmt, append_eos=False, max_length=room)
            if enc.n_response == 0:
                raise ValueError(f"label word {word!r} tokenises to nothing; it cannot be scored")
            truncated += enc.truncated > 0
            seqs.append(ScoredSequence(input_ids=enc.input_ids, n_prompt=enc.n_prompt))
    if truncated:
        log.warning("%d of %d scored sequences lost prompt tokens from the left to fit %s tokens",
                    truncated, len(seqs), max_length)
    return seqs


def _collate(
    batch: list[ScoredSequence], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, plus (row, col, target) of every scored label token.

    The logit at ``(row, col)`` predicts the token at ``col + 1`` of batch row ``row``.
    """
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, s in enumerate(batch):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        mask[b, :n] = 1
        rows += [b] * (n - s.n_prompt)
        cols += range(s.n_prompt - 1, n - 1)
        targets += s.input_ids[s.n_prompt:]
    pos = torch.tensor([rows, cols, targets], dtype=torch.long, device=device)
    return ids.to(device), mask.to(device), pos[0], pos[1], pos[2]


def _score_batch(model: nn.Module, batch: list[ScoredSequence], pad_id: int, device: torch.device) -> torch.Tensor:
    """Summed label-token log-probs of each sequence in ``batch`` (float32, on CPU)."""
    ids, mask, rows, cols, targets = _collate(batch, pad_id, device)
    n_prompt = torch.tensor([s.n_prompt for s in batch], device=device)
    prompt = torch.arange(ids.size(1), device=device).unsqueeze(0) < n_prompt.unsqueeze(1)  # (B, T)
    if attention_mode(model) == "prefix":  # the prompt part of every row is seen both ways
        mask = row_attention_mask(mask, n_prompt, model, next(model.parameters()).dtype)
    _, logits = selected_logits(model, ids, mask, rows, cols, prompt=prompt)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    sums = torch.zeros(len(batch), dtype=torch.float32, device=device).index_add_(0, rows, logp)
    return sums.cpu()


def length_batches(lengths: Sequence[int], batch_size: int,
                   blocks: Sequence[Hashable] | None = None) -> list[list[int]]:
    """Indices into ``lengths`` cut into batches of at most ``batch_size``, longest first (similar lengths share
    a batch, so little of it is padding; an OOM shows up at once). With ``blocks`` (one key per index), no batch
    spans two blocks, and a block's batches depend on its own members alone: the evaluation passes each prompt's
    instruction set, so a set's scores are the same whichever other sets run with it (in bf16 a batch's
    shape can flip a near-tie).

    >>> length_batches([3, 9, 5, 7], 2)
    [[1, 3], [2, 0]]
    >>> length_batches([3, 9, 5, 7], 2, blocks=["a", "b", "a", "b"])
    [[2, 0], [1, 3]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if blocks is not None and len(blocks) != len(lengths):
        raise ValueError(f"blocks has {len(blocks)} entries for {len(lengths)} items")
    members: dict[Hashable, list[int]] = {}
    for i, b in enumerate(blocks if blocks is not None else [None] * len(lengths)):
        members.setdefault(b, []).append(i)
    out: list[list[int]] = []
    for idx in members.values():
        idx.sort(key=lambda i: -lengths[i])
        out += [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    return out


def score_sequences(
    model: nn.Module, seqs: list[ScoredSequence], *, pad_id: int, batch_size: int, desc: str = "loglik",
    blocks: Sequence[Hashable] | None = None,
) -> torch.Tensor:
    """Summed label log-probs per sequence, in input order, batched by :func:`length_batches` (``blocks``: one
    key per sequence; no batch spans two)."""
    device = _model_device(model)
    batches = length_batches([len(q.input_ids) for q in seqs], batch_size, blocks)
    out = torch.empty(len(seqs), dtype=torch.float32)
    with _eval_mode(model), torch.inference_mode():
        for idx in bar(batches, desc=desc, unit="batch", leave=False,
                       show=len(batches) > 1):  # no bar for a single batch (predict)
            out[idx] = _score_batch(model, [seqs[i] for i in idx], pad_id, device)
    return out


class _eval_mode:
    """Context manager: ``model.eval()`` inside, the caller's train/eval mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# --------------------------------------------------------------------------- kv-cache path


def cache_support(model: nn.Module) -> str | None:
    """``None`` if the kv-cache path can run on ``model``, else the reason it cannot (for the report).

    Needs: a separable LM head (:func:`split_body_head`), a body that takes ``position_ids`` and
    ``past_key_values``, and a returned cache that is a plain ``DynamicCache`` of full-attention
    layers (rows can then be selected/repeated freely), in a model without a local window over cache slots
    (GPT-Neo's local layers). Checked with a 2-token forward pass.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    body, head = split_body_head(model)
    if head is None:
        return "no separable LM head (logit post-processing or an unusual head)"
    cfg = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    layers = getattr(cfg, "attention_layers", None)
    if isinstance(layers, (list, tuple)) and "local" in layers:
        # GPT-Neo: its local layers' window is a fixed band over cache slots, kept in plain DynamicLayers, so a
        # row right-padded in a shared cache counts its padding as window positions: scores moved with the batch
        return (f"local attention over a window of {getattr(cfg, 'window_size', '?')} cache slots (GPT-Neo): a "
                "padded row's holes would count as positions")
    params = inspect.signature(body.forward).parameters
    if not {"position_ids", "past_key_values"} <= set(params):
        return f"{type(body).__name__}.forward takes no position_ids/past_key_values"
    device = _model_device(model)
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    try:
        with _eval_mode(model), torch.inference_mode():
            out = body(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the plain path
        return f"a cached forward pass failed ({type(exc).__name__}: {exc})"
    if offsets_positions(model):
        return ("it numbers positions from an offset (RoBERTa's padding_idx + 1), and the cache path numbers them "
                "from 0")
    cache = getattr(out, "past_key_values", None)
    if not isinstance(cache, DynamicCache):
        return f"the model returns {type(cache).__name__} as its cache, not a DynamicCache"
    kinds = {type(layer).__name__ for layer in cache.layers}
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return f"cache layers of type {sorted(kinds)} (sliding-window/linear) cannot be shared across rows"
    return None


def offsets_positions(model: nn.Module) -> bool:
    """Whether ``model``'s body, given no ``position_ids``, numbers its tokens other than 0, 1, 2, ... (RoBERTa,
    XLM-R, CamemBERT: from ``padding_idx + 1``). The cache path and ``model.generate`` pass positions from 0, so such a
    model scored and decoded at positions it was never run at: greedy answers its own forward rated far below the
    argmax. Checked with a 2-token forward pass with and without ``position_ids``."""
    body, _ = split_body_head(model)
    if "position_ids" not in inspect.signature(body.forward).parameters:
        return False
    device = _model_device(model)
    try:
        vocab = model.get_input_embeddings().num_embeddings
        pad = getattr(getattr(body, "config", None), "pad_token_id", None)
        probe = [t for t in (vocab - 3, vocab - 2, vocab - 1) if t >= 0 and t != pad][-2:]  # ids any vocabulary holds
        ids = torch.tensor([probe], dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        with _eval_mode(model), torch.inference_mode():
            own = body(input_ids=ids, attention_mask=mask)[0]
            numbered = body(input_ids=ids, attention_mask=mask,
                            position_ids=torch.arange(ids.size(1), device=device)[None])[0]
    except Exception:  # noqa: BLE001 - a body that cannot run this probe is judged by the callers' own checks
        return False
    return not torch.allclose(own.float(), numbered.float(), rtol=1e-3, atol=1e-4)


@dataclass
class _State:
    """Per-row KV cache of the tokens run so far. Row ``r`` holds ``length[r]`` real tokens; ``mask``
    marks them inside the (right-padded, so possibly holed) cache width."""

    cache: object            # transformers DynamicCache, batch = rows
    mask: torch.Tensor       # (R, W) long: 1 = real token in the cache
    length: torch.Tensor     # (R,) long: real tokens so far = position id of the row's next token


def _select(state: _State, rows: torch.Tensor, config) -> _State:
    """A new state whose row ``k`` is ``state``'s row ``rows[k]`` (copies; the source stays intact)."""
    from transformers import DynamicCache

    cache = DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in state.cache.layers], config=config)
    return _State(cache, state.mask[rows], state.length[rows])


@dataclass(frozen=True, eq=False)
class _CachedLM:
    """A model split for incremental passes on a per-row KV cache: its transformer body and LM head (None
    where it has no separable one), the config a cache is rebuilt with, the id that pads new tokens and the
    device."""

    body: nn.Module
    head: nn.Module | None
    config: Any
    pad_id: int
    device: torch.device

    @classmethod
    def of(cls, model: nn.Module, pad_id: int) -> _CachedLM:
        body, head = split_body_head(model)
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        return cls(body=body, head=head, config=config, pad_id=pad_id, device=_model_device(model))

    def extend(
        self, state: _State | None, rows: torch.Tensor | None, seqs: list[list[int]], *, bidirectional: bool = False,
    ) -> tuple[torch.Tensor, _State]:
        """Run ``seqs[k]`` after row ``rows[k]`` of ``state`` (or from scratch): ``(hidden (R, T, H), new state)``.

        New tokens are right-padded; their position ids continue each row's own length, so a row's
        numbers do not depend on the padding of the others (holes in the cache are masked out).
        ``bidirectional`` (from scratch only): the tokens see each other both ways (a prefix LM's prompt);
        continuations are always causal, which is what a prefix LM's response is.
        """
        if bidirectional and state is not None:
            raise ValueError("_CachedLM.extend: only a pass from scratch (a whole prompt) can be bidirectional")
        body, device = self.body, self.device
        n, width = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for k, s in enumerate(seqs):
            ids[k, :len(s)] = torch.tensor(s)
            mask[k, :len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        if state is None:
            cache, prev_mask, prev_len = None, mask[:, :0], torch.zeros(n, dtype=torch.long, device=device)
        else:
            sel = _select(state, rows, self.config)
            cache, prev_mask, prev_len = sel.cache, sel.mask, sel.length
        pos = (prev_len[:, None] + torch.arange(width, device=device)[None, :]) * mask  # pads: position 0, masked
        full_mask = torch.cat([prev_mask, mask], dim=1)
        attn = bidirectional_mask(mask, body, next(body.parameters()).dtype) if bidirectional else full_mask
        out = body(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.last_hidden_state, _State(out.past_key_values, full_mask, prev_len + mask.sum(dim=1))


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1  # every prompt keeps >= 1 own token: its last hidden state scores label 1
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _score_cached(
    request: ScoringRequest, prompt_ids: list[list[int]], labels: list[list[int]]
) -> tuple[torch.Tensor, float, int]:
    """``(scores (P, L), mean shared prefix length, forward tokens)`` of ``request`` on the kv-cache path,
    given its prompts' token ids and the label words' token ids.

    Per batch of prompts (group-contiguous, sorted by length within a group), up to three passes::

        prefixes   one row per group in the batch: its longest common token prefix   (only with groups)
        suffixes   one row per prompt: the rest of it, after its group's prefix row  -> log P(label token 1)
        labels     one row per (prompt, label of >= 2 tokens): w_1..w_{k-1}           -> log P(tokens 2..k)
    """
    model, batch_size, min_prefix = request.model, request.batch_size, request.min_prefix
    groups = list(request.groups) if request.groups is not None else None
    lm = _CachedLM.of(model, _pad_id(request.tokenizer))
    head, device = lm.head, lm.device
    prefix_lm, mean_readout = attention_mode(model) == "prefix", readout_mode(model) == "mean"
    if reads_prompt_whole(model):
        groups = None  # a prefix LM's prompt is seen whole (its instruction's states depend on the input); the
        # mean readout needs every prompt state in one pass
    n_labels = len(labels)
    first_tok = torch.tensor([w[0] for w in labels], device=device)
    multi = [j for j, w in enumerate(labels) if len(w) > 1]
    scores = torch.zeros((len(prompt_ids), n_labels), dtype=torch.float32)
    work, prefix_sum = 0, 0

    group_of = [None] * len(prompt_ids) if groups is None else list(groups)
    blocks = list(request.blocks) if request.blocks is not None else [None] * len(prompt_ids)
    by_block: dict[Hashable, dict[Hashable, list[int]]] = {}
    for i, (b, g) in enumerate(zip(blocks, group_of, strict=True)):
        by_block.setdefault(b, {}).setdefault(g, []).append(i)
    prefix_len: dict[Hashable, int] = {}
    batches: list[list[int]] = []
    for by_group in by_block.values():  # no batch spans two blocks (length_batches)
        order: list[int] = []
        for k, (g, members) in enumerate(by_group.items()):
            # longest first, alternating direction per group ("snake"): a batch that spans the end of one group
            # and the start of the next joins prompts of similar length, so little of it is padding
            members.sort(key=lambda i: len(prompt_ids[i]), reverse=k % 2 == 0)
            order += members
            prefix_len[g] = _common_prefix([prompt_ids[i] for i in members]) if groups is not None else 0
        batches += [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    with _eval_mode(model), torch.inference_mode():
        for idx in bar(batches, desc=request.desc, unit="batch", leave=False, show=len(batches) > 1):
            in_batch = list(dict.fromkeys(group_of[i] for i in idx))
            state, rows, cut = None, None, {g: 0 for g in in_batch}
            if groups is not None and all(prefix_len[g] >= min_prefix for g in in_batch):
                cut = {g: prefix_len[g] for g in in_batch}
                first = {g: next(i for i in idx if group_of[i] == g) for g in in_batch}
                prefixes = [prompt_ids[first[g]][:cut[g]] for g in in_batch]
                _, state = lm.extend(None, None, prefixes)
                rows = torch.tensor([in_batch.index(group_of[i]) for i in idx], device=device)
                work += sum(map(len, prefixes))
                prefix_sum += sum(cut[group_of[i]] for i in idx)
            suffixes = [prompt_ids[i][cut[group_of[i]]:] for i in idx]
            hidden, st = lm.extend(state, rows, suffixes, bidirectional=prefix_lm)
            work += sum(map(len, suffixes))
            last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
            if mean_readout:  # cut is 0 here: the pass holds the whole prompt
                real = (torch.arange(hidden.size(1), device=device).unsqueeze(0) <= last.unsqueeze(1))  # (B, T)
                read = (hidden.float() * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True)       # (B, H)
                read = read.to(hidden.dtype)
            else:
                read = hidden[torch.arange(len(idx), device=device), last]                            # (B, H)
            logp = torch.log_softmax(head(read).float(), dim=-1)
            batch_scores = logp[:, first_tok]  # (B, L): log P(first label token | prompt)
            if multi:
                pairs = [(b, j) for b in range(len(idx)) for j in multi]
                conts = [labels[j][:-1] for _, j in pairs]            # inputs predicting tokens 2..k
                h2, _ = lm.extend(st, torch.tensor([b for b, _ in pairs], device=device), conts)
                work += sum(map(len, conts))
                r, c, t, dest = [], [], [], []
                for k, (b, j) in enumerate(pairs):
                    for q, tok in enumerate(labels[j][1:]):
                        r.append(k), c.append(q), t.append(tok), dest.append(b * n_labels + j)
                sel = torch.tensor([r, c, t, dest], dtype=torch.long, device=device)
                lp2 = torch.log_softmax(head(h2[sel[0], sel[1]]).float(), dim=-1).gather(1, sel[2][:, None])[:, 0]
                batch_scores = batch_scores.reshape(-1).index_add(0, sel[3], lp2).view(len(idx), n_labels)
            scores[idx] = batch_scores.cpu()
    return scores, prefix_sum / max(len(prompt_ids), 1), work


# --------------------------------------------------------------------------- public API


def _blocks_of(groups: Sequence[Hashable], blocks: Sequence[Hashable]) -> dict[Hashable, set[Hashable]]:
    out: dict[Hashable, set[Hashable]] = {}
    for g, b in zip(groups, blocks, strict=True):
        out.setdefault(g, set()).add(b)
    return out


@dataclass(frozen=True, eq=False)
class ScoringRequest:
    """One label-word scoring: the model and its tokenizer, the prompts, the label words to score after
    each of them, and how (prompt format, batch size, length normalisation, kv-cache path, prefix sharing).

    ``groups`` (same length as ``prompts``, e.g. the instruction of each prompt) turns on prefix
    sharing: each group's longest common token prefix (at least ``min_prefix`` tokens) runs once.
    ``blocks`` (same length as ``prompts``, e.g. the instruction set of each prompt): no batch spans two blocks
    (:func:`length_batches`), so a block's scores do not depend on the prompts of other blocks.
    ``use_cache=False`` forces the per-label path (used by tests and the benchmark). ``desc`` labels the
    progress bar. Checked when made: an empty label list, a batch size below 1, a ``groups`` or ``blocks`` of
    another length than ``prompts``, or a group in two blocks is a ``ValueError``.
    """

    model: nn.Module
    tokenizer: Any
    prompts: Sequence[str]
    label_words: Sequence[str]
    fmt: PromptFormat = "train"
    batch_size: int = 32
    length_normalise: bool = False
    use_cache: bool = True
    groups: Sequence[Hashable] | None = None
    min_prefix: int = 4
    blocks: Sequence[Hashable] | None = None
    desc: str = "loglik"

    def __post_init__(self) -> None:
        if not self.label_words:
            raise ValueError("label_words is empty")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("groups", "blocks"):
            keys = getattr(self, name)
            if keys is not None and len(keys) != len(self.prompts):
                raise ValueError(f"{name} has {len(keys)} entries for {len(self.prompts)} prompts")
        if self.groups is not None and self.blocks is not None and any(
                len(bs) > 1 for bs in _blocks_of(self.groups, self.blocks).values()):
            raise ValueError("a group spans two blocks; a group's prompts must share one block")


def score_labels(request: ScoringRequest) -> LoglikOutput:
    """Label-word log-likelihoods of every prompt of ``request``, with how they were computed."""
    labels = label_token_ids(request.tokenizer, request.label_words, request.fmt)
    n_label_tokens = torch.tensor([len(w) for w in labels], dtype=torch.float32)
    reason = cache_support(request.model) if request.use_cache else "disabled (use_cache=False)"
    out = _score_on_cache(request, labels) if reason is None else _score_per_label(request, reason)
    if request.length_normalise:
        out.scores = out.scores / n_label_tokens
    return out


def _score_on_cache(request: ScoringRequest, labels: list[list[int]]) -> LoglikOutput:
    """The kv-cache path: prompts encoded once (cut from the left to leave room for the longest label)."""
    model = request.model
    max_len = _max_length(model)
    budget = None if max_len is None else max_len - max(map(len, labels))
    encs = [encode(request.tokenizer, p, "", fmt=request.fmt, append_eos=False, max_length=budget)
            for p in request.prompts]
    truncated = sum(e.truncated > 0 for e in encs)
    if truncated:
        log.warning("%d of %d prompts lost tokens from the left to fit %s tokens", truncated, len(encs), max_len)
    scores, prefix, work = _score_cached(request, [e.input_ids for e in encs], labels)
    out = LoglikOutput(scores=scores, path="kv-cache", prefix_tokens=prefix, forward_tokens=work)
    if request.groups is not None and reads_prompt_whole(model):
        out.notes.append("prefix sharing not applied: under the prefix-LM attention every prompt token sees "
                         "the input, and the mean readout needs every prompt state, so no instruction prefix "
                         "is shared")
    return out


def _score_per_label(request: ScoringRequest, reason: str) -> LoglikOutput:
    """The fallback path: one sequence per (prompt, label word); ``reason``: why the kv-cache path is not taken."""
    model, tokenizer = request.model, request.tokenizer
    if request.use_cache:
        log.warning("loglik: kv-cache path unavailable for %s (%s); scoring one sequence per label word",
                    type(model).__name__, reason)
    seqs = build_sequences(tokenizer, list(request.prompts), list(request.label_words), fmt=request.fmt,
                           max_length=_max_length(model))
    n_labels = len(request.label_words)  # build_sequences: prompt-major, one sequence per label word
    blocks = None if request.blocks is None else [b for b in request.blocks for _ in range(n_labels)]
    flat = score_sequences(model, seqs, pad_id=_pad_id(tokenizer), batch_size=request.batch_size, desc=request.desc,
                           blocks=blocks)
    out = LoglikOutput(scores=flat.view(len(request.prompts), len(request.label_words)), path="per-label",
                       path_note=reason, forward_tokens=sum(len(s.input_ids) for s in seqs))
    if request.groups is not None:
        out.notes.append(f"prefix sharing not applied: {reason}")
    return out


def score_label_words(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    label_words: list[str],
    *,
    fmt: PromptFormat = "train",
    batch_size: int = 32,
    length_normalise: bool = False,
    use_cache: bool = True,
    groups: Sequence[Hashable] | None = None,
    min_prefix: int = 4,
    desc: str = "loglik",
) -> LoglikOutput:
    """:func:`score_labels` of a :class:`ScoringRequest` made of these arguments (see it for each)."""
    return score_labels(ScoringRequest(
        model=model, tokenizer=tokenizer, prompts=prompts, label_words=label_words, fmt=fmt, batch_size=batch_size,
        length_normalise=length_normalise, use_cache=use_cache, groups=groups, min_prefix=min_prefix, desc=desc))


def calibrated(scores: torch.Tensor, content_free: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Contextual calibration (Zhao et al. 2021, "Calibrate Before Use") with a label prior.

    ``scores`` (P, L): label log-likelihoods after each prompt; ``content_free`` (P, L): the same labels after
    the same instruction with an empty input (the bias the instruction alone puts on each label);
    ``log_prior`` (L,): log share of each label in the model's training rows (None: uniform). The result is
    ``scores - content_free + log_prior``: what the input adds to each label, on top of how often the label
    was right in training. It moves decisions only where the instruction, not the input, drove them.

    >>> s = torch.tensor([[-0.1, -2.5], [-0.3, -1.4]]); cf = torch.tensor([[-0.2, -1.8], [-0.2, -1.8]])
    >>> calibrated(s, cf).argmax(1).tolist()   # the instruction alone favours label 0 by 1.6 nats
    [0, 1]
    """
    out = scores - content_free
    return out if log_prior is None else out + log_prior.to(out.dtype)


def label_log_prior(counts: Sequence[int]) -> torch.Tensor:
    """Log label shares from training counts, add-one smoothed (a label never seen keeps a small share)."""
    c = torch.tensor([float(x) for x in counts]) + 1.0
    return torch.log(c / c.sum())


def loglik_scores(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    label_words: list[str],
    *,
    fmt: PromptFormat = "train",
    batch_size: int = 32,
    length_normalise: bool = False,
    use_cache: bool = True,
    desc: str = "loglik",
) -> torch.Tensor:
    """``(len(prompts), len(label_words))`` log-probabilities of each label word after each prompt.

    ``length_normalise`` divides by the number of label tokens (per-token log-prob), which removes the
    bias towards label words that tokenise into fewer pieces.
    """
    return score_label_words(model, tokenizer, prompts, label_words, fmt=fmt, batch_size=batch_size,
                             length_normalise=length_normalise, use_cache=use_cache, desc=desc).scores


def predict_labels(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    label_words: list[str],
    *,
    fmt: PromptFormat = "train",
    batch_size: int = 32,
    length_normalise: bool = False,
) -> torch.Tensor:
    """Index of the most likely label word per prompt (``argmax`` of :func:`loglik_scores`)."""
    scores = loglik_scores(model, tokenizer, prompts, label_words, fmt=fmt, batch_size=batch_size,
                           length_normalise=length_normalise)
    return scores.argmax(dim=1)
