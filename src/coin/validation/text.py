"""Text normalisers shared by the checks and the leak matching (a leaf of :mod:`coin.validation`).

:func:`squash` is the "differs only in form" key (``paraphrase_differs``) and the base of
:func:`coin.validation.leakage.normalise`; :func:`replace_surrogates` makes text that was not valid
UTF-8 safe for Great Expectations, the tokenizers and the embedder.
"""

from __future__ import annotations

import re
import unicodedata


def squash(text: str) -> str:
    """Casefolded NFKC text without whitespace, punctuation, invisible format characters (Unicode category Cf:
    soft hyphen, zero-width space and joiners, byte-order mark) and control characters (Cc: NUL, DEL, the C1
    block), which WordPiece drops too: equal squash = 'differs only in form'. A NUL inside a copied evaluation
    example hid it from the leak check, while the tokenizer gave the model the example's very ids.

    >>> squash("Is it  GOOD?") == squash("is it good")
    True
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    out = text.translate(_DROP_BMP)
    if out.isascii():
        return out
    return "".join(c for c in out if not (c.isspace() or unicodedata.category(c)[0] == "P"
                                          or unicodedata.category(c) in _INVISIBLE))


_INVISIBLE = ("Cf", "Cc")  # format and control characters

# whitespace, punctuation, format and control characters of the Basic Multilingual Plane, deleted by str.translate
# (fast path of squash)
_DROP_BMP = {
    i: None for i in range(0x10000)
    if not 0xD800 <= i <= 0xDFFF and (chr(i).isspace() or unicodedata.category(chr(i))[0] == "P"
                                      or unicodedata.category(chr(i)) in _INVISIBLE)
}


_SURROGATES = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """Lone surrogates as U+FFFD (same length): GX and the Rust tokenizers refuse them outright.
    Only rows that text_valid rejects contain them."""
    return _SURROGATES.sub("\ufffd", text)


def apart(value: float, bound: float, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals, or to as many more as it takes to read on the same side of ``bound`` as it
    is (a cosine of 0.68487 was printed "0.685, below validate.min_similarity = 0.685"; a pass rate of 0.997 beside a
    threshold of 0.9974 read "pass rate 0.997, threshold 0.997" next to FAILED)."""
    for n in range(digits, 16):
        text = f"{value:.{n}f}"
        if (float(text) < bound) == (value < bound) and (float(text) > bound) == (value > bound):
            return text
    return repr(value)


def shorten(text: str, limit: int, where: str) -> str:
    """``text`` whole, or cut to ``limit`` characters with a mark that says where the whole is (``where``): a reason
    cut at 300 characters lost what was wrong, with nothing to say it had been cut."""
    if len(text) <= limit:
        return text
    return text[:limit].rstrip() + f" … (cut; whole in {where})"
