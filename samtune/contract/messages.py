"""Plain text for messages: the first line of an error, shown to the user on one line, and
addresses with their credentials masked.

`masked` is the one place that decides what of an address may be shown or saved: every tracking
URI or storage URI that samtune prints, logs, tags or writes to a file goes through it.

>>> masked("sweep at http://alice:s3cret@mlflow.example:5000/ failed")
'sweep at http://alice:***@mlflow.example:5000/ failed'
>>> masked("https://token@host/x and sqlite:///tmp/mlflow.db")
'https://***@host/x and sqlite:///tmp/mlflow.db'
>>> masked("s3://sweeps/runs?region=us-east-1&access_key=AKIA1&secret_key=abc&session_token=t")
's3://sweeps/runs?region=us-east-1&access_key=***&secret_key=***&session_token=***'
>>> masked("'postgresql://mlflow:pw@db/mlflow?sslmode=require&password=pw'")
"'postgresql://mlflow:***@db/mlflow?sslmode=require&password=***'"
>>> has_masked_secret("http://alice:***@host:5000"), has_masked_secret("http://host:5000")
(True, False)
>>> without_credentials("http://alice:s3cret@127.0.0.1:5000/")
'http://127.0.0.1:5000/'
"""

from __future__ import annotations

import re

#: What replaces a secret.
MASK = "***"

# An address: a scheme, "://", and everything up to whitespace or a quote around it.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*")
# The user-information part of an address ("user:password@" or "token@"), up to its host.
_USERINFO = re.compile(r"^(?P<scheme>[^:]+://)(?P<user>[^/?#@:]*)(?::[^/?#@]*)?@")
# A query parameter whose name says it holds a secret (access_key, secret_key, session_token,
# password, X-Amz-Signature, ...); its value runs to the next parameter or the fragment.
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&;#]*(?:secret|key|token|password|passwd|session|signature|credential)[^=&;#]*=)"
    r"(?P<value>[^&;#]*)",
    re.IGNORECASE,
)


def masked(text: str) -> str:
    """``text`` with the secrets of every address in it replaced by ``***``: the password of
    ``scheme://user:password@host`` (the whole user part when it is a lone token,
    ``scheme://token@host``) and the value of each query parameter whose name holds *secret*,
    *key*, *token*, *password*, *session*, *signature* or *credential* (``s3://bucket/prefix?
    access_key=...&secret_key=...``, as pyarrow's S3 URIs allow). What a message, log line,
    tag, saved file or printed command may show of a tracking or storage URI.
    """
    return _URL.sub(lambda m: _masked_url(m.group(0)), text)


def _masked_url(url: str) -> str:
    def hide_user(m: re.Match[str]) -> str:
        if ":" in m.group(0)[len(m.group("scheme")) :]:
            return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
        return f"{m.group('scheme')}{MASK}@"

    url = _USERINFO.sub(hide_user, url, count=1)
    if "?" in url:
        head, _, query = url.partition("?")
        url = head + _SECRET_PARAM.sub(lambda m: m.group("name") + MASK, "?" + query)
    return url


def has_masked_secret(uri: str) -> bool:
    """Whether `uri` is an address whose secret `masked` replaced (as saved in ``sweep.json``):
    it cannot be used until the secret is given again."""
    filled = uri.replace(MASK, "x")
    return MASK in uri and masked(filled) != filled


def without_credentials(url: str) -> str:
    """`url` without its user-information part (``user:password@``), for a request that needs no
    login (a health check) through a library that does not understand one in the address."""
    return _USERINFO.sub(lambda m: m.group("scheme"), url, count=1)


def first_line(exc: BaseException) -> str:
    """The first line of what `exc` says (its type's name when it says nothing)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
