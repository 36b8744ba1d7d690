"""A response is scored and trained as the tokens its tokenizer writes after the answer marker.

Tokenised on its own, a label word got a Llama-2-style tokenizer's leading-space token ('▁positive'), which that
tokenizer never writes after the marker's newline ('positive'): a base model was scored on a sequence it never
sees, and its answers could flip (audit round 26). WordPiece (the embedded MiniLM) gives the same ids either way,
so the default's training and scores do not change.
"""

from __future__ import annotations

import pytest
import torch

from coin.data.prompts import RESPONSE_MARKER, encode, format_prompt, response_ids, response_lengths
from coin.data.tasks import TASKS
from coin.evaluation.scoring import label_token_ids, score_label_words
from coin.modeling.backbone import load_backbone, load_tokenizer
from coin.validation.checks import token_lengths

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORDS = ["positive", "negative", "not_entailment"]


@pytest.mark.parametrize("fmt", ["train", "reference"])
def test_a_leading_space_tokenizer_scores_the_tokens_it_writes_after_the_marker(tiny_metaspace_llama_dir, fmt):
    tok = load_tokenizer(str(tiny_metaspace_llama_dir))
    alone = tok("positive", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[0].startswith("\u2581")  # the premise: alone it takes the space mark
    for word in WORDS:
        whole = tok(RESPONSE_MARKER[fmt] + word, add_special_tokens=False)["input_ids"]
        head = tok(RESPONSE_MARKER[fmt], add_special_tokens=False)["input_ids"]
        assert whole[:len(head)] == head
        assert response_ids(tok, word, fmt) == whole[len(head):]
        assert not tok.convert_ids_to_tokens(response_ids(tok, word, fmt))[0].startswith("\u2581")
    assert label_token_ids(tok, WORDS, fmt) == [response_ids(tok, w, fmt) for w in WORDS]
    assert response_lengths(tok, WORDS + [""], fmt) == {w: len(response_ids(tok, w, fmt)) for w in WORDS}
    enc = encode(tok, "Is this review positive? A gem.", "positive", fmt=fmt)
    assert enc.input_ids[enc.n_prompt:] == response_ids(tok, "positive", fmt) + [tok.eos_token_id]
    assert token_lengths(tok, ["Is this review positive? A gem."], ["positive"], fmt=fmt) == [len(enc.input_ids)]


def test_a_base_models_label_scores_are_its_log_likelihood_of_the_joined_text(tiny_metaspace_llama_dir):
    """As lm-evaluation-harness splits it: log p(the joined text's tokens past the prompt | BOS + prompt)."""
    bb = load_backbone(str(tiny_metaspace_llama_dir), device="cpu", seed=0)
    model, tok = bb.model.eval(), bb.tokenizer
    prompts = ["Sentiment: boring film", "Is this review positive or negative? a great movie"]
    got = score_label_words(model, tok, prompts, WORDS).scores
    for i, prompt in enumerate(prompts):
        context = [tok.bos_token_id] + tok(format_prompt(prompt), add_special_tokens=False)["input_ids"]
        for j, word in enumerate(WORDS):
            whole = [tok.bos_token_id] + tok(format_prompt(prompt) + word, add_special_tokens=False)["input_ids"]
            assert whole[:len(context)] == context
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            want = sum(float(logp[k - 1, whole[k]]) for k in range(len(context), len(whole)))
            assert float(got[i, j]) == pytest.approx(want, abs=1e-4), (prompt, word)


def test_wordpiece_responses_are_the_ids_they_always_were():
    """The embedded MiniLM: every task's label words, in both prompt formats, tokenise as before (alone)."""
    tok = load_tokenizer("minilm")
    for fmt in ("train", "reference"):
        for spec in TASKS.values():
            for word in spec.label_words:
                assert response_ids(tok, word, fmt) == tok(word, add_special_tokens=False)["input_ids"], (fmt, word)
