"""Redaction of credentials wherever the configuration is recorded: the one place that decides what is secret.

The settings are recorded in several places: MLflow params (every pipeline, training and study run logs the
flattened settings, :meth:`coin.config.Settings.to_flat_dict`), Prefect flow parameters (the ``--set``
overrides of ``coin pipeline`` / ``coin study``), ``coin params``, log lines and error messages. A password
written into ``tracking.uri`` (``http://user:secret@host:5000``) or any other value must not end up in any of
them in plain text. Every recorder goes through this module:

- :func:`redact_text`: the password of every ``scheme://user:password@host`` URI in a text becomes ``***``,
  and so does the value of a query parameter that names a secret (``?token=...``, ``&password=...``);
- :func:`redact_value` / :func:`redacted`: the value of a key that names a secret (:func:`is_secret_key`:
  ``password``, ``token``, ``secret``, ``api_key``, ...) becomes ``***`` whatever it is; other values are
  redacted as text (recursively in lists and mappings);
- :func:`redact_override`: one ``section.key=value`` override, the same way;
- :func:`seal_overrides` / :func:`reveal_overrides` (and :func:`seal_text` / :func:`reveal` for one value such
  as a Dask address): values passed as Prefect flow parameters. One that holds a secret travels as a
  :class:`Sealed` value (a pydantic ``SecretStr``): Prefect records its redacted form, the code uses the
  real one (``apply_overrides`` unwraps sealed overrides itself);
- :class:`RedactingFilter`: a logging filter that redacts every record's message.

Only the recorded form is redacted; what is *used* (the tracking URI MLflow connects to) keeps its value.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import SecretStr

REDACTED = "***"

# Words that make a key secret when they are one of its ``_``/``-``/``.``-separated words (so ``max_new_tokens``
# or ``tokenizer`` are not secret, ``hf_token`` and ``db.password`` are), and adjacent word pairs that do.
SECRET_WORDS = frozenset({"password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "apikey",
                          "credential", "credentials", "auth", "authorization", "cookie", "sas", "sig", "signature"})
SECRET_SUFFIXES = ("password", "passwd", "passphrase", "secret", "token", "apikey")  # run together: sslpassword
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"),
                          ("client", "secret"), ("account", "key"), ("session", "key")})

# scheme://user:password@  (the password runs to the last '@' before the path, query or whitespace, as HTTP
# clients split it: a literal '@' in it is part of it; ':' is allowed)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:@/?#]*):(?P<pw>[^\s/?#]*)@")
# a database URL's password, as SQLAlchemy reads it: anything (also '/', '?', '#') up to the last '@' of the word
_DB_SCHEME = r"(?:postgres(?:ql)?|mysql|mariadb|mssql|oracle|cockroachdb)(?:\+[A-Za-z0-9_]+)?"
# a database URL's password as SQLAlchemy reads it: up to the first '@', '/', '?' and '#' included; in running
# text it stops at whitespace too (the generic rule below then hides a password that holds an '@')
_DB_USERINFO = re.compile(rf"(?P<head>\b{_DB_SCHEME}://[^\s:@/?#]*):(?P<pw>[^@\s]*)@", re.IGNORECASE)
# a whole value's user name: spaces inside it, no line break (a value over two lines is not one URI); a note
# such as "https://host see: bob@corp.com" is still hidden up to its '@', the safe side
_WHOLE_USER = r"[^\r\n:@/?#]*"
# a setting whose whole value is one database URL: its user name may hold a space, its password a space or an '@'
# too (hidden up to the last '@': what follows is the host)
_DB_WHOLE = re.compile(rf"^(?P<head>{_DB_SCHEME}://{_WHOLE_USER}):(?P<pw>.*)@(?P<rest>[^@\s]*)$",
                       re.IGNORECASE | re.DOTALL)
# a setting whose whole value is one URI of any other scheme (http(s), s3, ...): its user name may hold a space, its
# password a space or an '@' (HTTP clients take the user info up to the last '@' before the path, spaces and all)
_ANY_WHOLE = re.compile(rf"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://{_WHOLE_USER}):(?P<pw>[^/?#]*)@"
                        r"(?P<rest>[^@/?#]*(?:[/?#].*)?)$", re.DOTALL)
# ?token=...  &password=...  (a query parameter whose name is secret)
_QUERY = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&;#\s'\"]*)")


def _words(key: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", key.lower()) if w]


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) key names a secret: one of its words is in :data:`SECRET_WORDS`, or two adjacent
    words are a pair of :data:`SECRET_PAIRS` (``api_key``, ``access-key``, ``client_secret``).

    A word that ends in one of :data:`SECRET_SUFFIXES` is secret too (libpq's ``sslpassword``, ``accesstoken``).

    >>> [is_secret_key(k) for k in ("tracking.password", "hf_token", "aws.secret_access_key", "max_new_tokens",
    ...                             "sslpassword", "authtoken", "tokenizer")]
    [True, True, True, False, True, True, False]
    """
    words = _words(key)
    return (any(w in SECRET_WORDS or w.endswith(SECRET_SUFFIXES) for w in words)
            or any(p in SECRET_PAIRS for p in zip(words, words[1:], strict=False)))


def redact_text(text: str) -> str:
    """``text`` with the password of every URI's user info and every secret query value replaced by ``***``.

    >>> redact_text("cannot reach http://alice:s3cr%40t@mlflow:5000/api?token=abc&x=1")
    'cannot reach http://alice:***@mlflow:5000/api?token=***&x=1'
    >>> redact_text("http://u:p@ss@host:5000/x")  # split at the last '@', as urllib does: all of it hidden
    'http://u:***@host:5000/x'
    >>> redact_text("postgresql://bob@db/coin")  # no password: nothing to hide
    'postgresql://bob@db/coin'
    >>> redact_text("postgresql+psycopg2://u:pa/ss#1@127.0.0.1/db")  # SQLAlchemy takes '/' and '#' in one
    'postgresql+psycopg2://u:***@127.0.0.1/db'
    """
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text
    out = _DB_USERINFO.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    out = _USERINFO.sub(lambda m: f"{m['head']}:{REDACTED}@", out)

    def query(m: re.Match[str]) -> str:
        return f"{m['head']}{REDACTED}" if m["value"] and is_secret_key(m["name"]) else m.group(0)

    return _QUERY.sub(query, out)


def redact_value(key: str, value: Any) -> Any:
    """The recorded form of ``value`` under ``key``: ``***`` for a non-empty value of a secret key, else the
    value with :func:`redact_text` applied to every string in it (lists and mappings recursively)."""
    if is_secret_key(key) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, Mapping):
        return {k: redact_value(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(key, v) for v in value)
    return value


def redacted(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` (flat ``{"tracking.uri": ...}`` or nested) with every value in its recorded form."""
    return {k: redact_value(str(k), v) for k, v in mapping.items()}


def redact_override(item: str) -> str:
    """One ``section.key=value`` override in its recorded form.

    >>> redact_override("tracking.uri=http://u:pw@host:5000"), redact_override("db.password=hunter2")
    ('tracking.uri=http://u:***@host:5000', 'db.password=***')
    """
    if "=" not in item:
        return redact_text(item)
    key, value = item.split("=", 1)
    return (f"{key}={REDACTED}" if is_secret_key(key) and value.strip()
            else f"{key}={redact_uri(value)}")


def redact_uri(value: str) -> str:
    """A value that is one URI (``tracking.uri``, a Dask address) in its recorded form: its password hidden, also one
    with a space or an '@' (:func:`redact_text` alone reads running text, where a space ends the URI)."""
    return redact_text(_redact_whole_uri(value))


def _redact_whole_uri(value: str) -> str:
    """A setting that is one URL with its password hidden, spaces and all (running text cannot tell a space in a
    password from the end of the URL: ``http://alice:S3 CRET@host:1`` was recorded in clear); any other value
    unchanged.

    >>> _redact_whole_uri("http://alice:S3 CRET@127.0.0.1:5000"), _redact_whole_uri("postgresql://u:p w@db/coin")
    ('http://alice:***@127.0.0.1:5000', 'postgresql://u:***@db/coin')
    >>> _redact_whole_uri("http://127.0.0.1:5000/a@b"), _redact_whole_uri("a plain value: x@y")
    ('http://127.0.0.1:5000/a@b', 'a plain value: x@y')
    """
    whole = _DB_WHOLE.match(value.strip()) or _ANY_WHOLE.match(value.strip())
    return f"{whole['head']}:{REDACTED}@{whole['rest']}" if whole else value


class Sealed(SecretStr):
    """A value that holds a secret, as a Prefect flow parameter: its real text is :meth:`get_secret_value`;
    ``str()`` (what Prefect's parameter serialiser records, and what logs show) is its redacted form, so what
    is not secret stays readable (``tcp://user:***@host:8786``)."""

    def __init__(self, secret_value: str, shown: str | None = None) -> None:
        super().__init__(secret_value)
        self._shown = redact_text(secret_value) if shown is None else shown

    def __str__(self) -> str:
        return self._shown

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._shown!r})"


class SealedOverride(Sealed):
    """A ``section.key=value`` override that holds a secret; shown as :func:`redact_override` gives it (the key
    stays visible, a secret key's whole value is hidden)."""

    def __init__(self, secret_value: str) -> None:
        super().__init__(secret_value, redact_override(secret_value))


def seal_text(value: str | SecretStr | None) -> str | SecretStr | None:
    """``value`` as a flow parameter: :class:`Sealed` when it holds a credential (:func:`redact_uri`), else as is."""
    if value is None or isinstance(value, SecretStr) or redact_uri(value) == value:
        return value
    return Sealed(value, redact_uri(value))


def reveal(value: str | SecretStr | None) -> str | None:
    """The real text of a value sealed by :func:`seal_text` (or a plain one)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def seal_overrides(overrides: Iterable[str | SecretStr] | None) -> list[str | SecretStr]:
    """``overrides`` with each one that holds a secret wrapped in a :class:`SealedOverride` (the others stay
    plain strings, so the recorded flow parameters stay readable). Idempotent."""
    out: list[str | SecretStr] = []
    for item in overrides or []:
        if isinstance(item, SecretStr):
            out.append(item)
        elif redact_override(item) != item:
            out.append(SealedOverride(item))
        else:
            out.append(item)
    return out


def reveal_override(item: str | SecretStr) -> str:
    """The real text of one override (plain, or sealed by :func:`seal_overrides`)."""
    return item.get_secret_value() if isinstance(item, SecretStr) else item


def reveal_overrides(overrides: Iterable[str | SecretStr] | None) -> list[str]:
    return [reveal_override(o) for o in overrides or []]


class RedactingFilter(logging.Filter):
    """Redacts every record's formatted message (:func:`redact_text`) before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a malformed record is logging's problem, not ours
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
