"""Leaderboard server, web page and submission client.

The Python API: `build_submission(run_dir, method_name=...)` (the payload `clipsift submit` sends),
`post_local(db_url, payload)` (verify and store without a server; the submission id) and
`submission_url(base_url, id)`. See docs/leaderboard.md.
"""

from __future__ import annotations

from typing import Any

_API = {"build_submission": "client", "submission_url": "client", "post_submission": "client", "post_local": "store"}


def __getattr__(name: str) -> Any:  # imported on first use: the client needs neither SQLAlchemy nor FastAPI
    if name in _API:
        from importlib import import_module

        return getattr(import_module(f"clipsift.leaderboard.{_API[name]}"), name)
    raise AttributeError(f"module 'clipsift.leaderboard' has no attribute {name!r}")


__all__ = list(_API)
