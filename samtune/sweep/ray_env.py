"""The environment samtune runs Ray with (no Ray import here: it is read before Ray is).

Ray Train's generation is chosen where a trial runs; Tune's output settings where the sweep's
driver runs. Set in this process before Ray is imported, and handed to a Ray job's workers,
which on a cluster started by `ray start` do not inherit this process's environment. And the
auth tokens this process can present to a cluster that asks for one, found where Ray looks.
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # Tune's own progress tables and the driver's copy of every worker log would bury the view.
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Ray starts its worker processes at nice 15, below everything else on the machine. Beside
    # any other busy process (a second sweep, a build) the trials, their Ray Train workers and the
    # controllers that tear worker groups down then get a few percent of a core: a 2-worker trial
    # finished, the next one waited out its placement timeout while the last one's worker group
    # was still being torn down. At 0 they share the machine fairly. Read by the raylet a sweep
    # starts itself; a `ray start` cluster takes it from the environment `ray start` runs in.
    "RAY_worker_niceness": "0",
}


def apply_ray_env() -> dict:
    """Set each variable this process has not set itself; returns a `runtime_env` that hands
    the values in force to a Ray job's workers."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    return {"env_vars": {key: os.environ[key] for key in RAY_ENV}}


#: Ray's switch for token authentication ("token" or "disabled"), read when Ray starts in a process.
AUTH_MODE_VAR = "RAY_AUTH_MODE"
#: The two ways to hand a driver a cluster's token: the token itself, or a file holding it.
TOKEN_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"
#: Where `ray start` and a new local Ray instance keep the token of this machine's user.
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


def auth_tokens() -> list[tuple[str, str]]:
    """The Ray auth tokens this process can present, each with where it is, in the order Ray
    looks (the first is the one a driver sends): `RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH`
    names, ``~/.ray/auth_token``. Unreadable or empty files are left out.

    >>> os.environ[TOKEN_VAR] = "abc"
    >>> auth_tokens()[0]
    ('RAY_AUTH_TOKEN', 'abc')
    >>> del os.environ[TOKEN_VAR]
    """
    found = []
    if os.environ.get(TOKEN_VAR, "").strip():
        found.append((TOKEN_VAR, os.environ[TOKEN_VAR].strip()))
    files = (
        [(f"{TOKEN_PATH_VAR}={os.environ[TOKEN_PATH_VAR]}", Path(os.environ[TOKEN_PATH_VAR]))]
        if os.environ.get(TOKEN_PATH_VAR)
        else []
    )
    home = DEFAULT_TOKEN_FILE.expanduser()
    files.append((str(home), home))
    for where, path in files:
        try:
            token = path.read_text().strip()
        except OSError:
            continue
        if token:
            found.append((where, token))
    return found
