"""Every filter: importing this module imports each module that defines (registers) filters.

A new filter is one class in one module, decorated with `base.register`; add its module to the list below.
"""

from __future__ import annotations

import functools

from clipsift.filters import (  # noqa: F401  (the modules that register filters)
    balance,
    base,
    caption_quality,
    clip,
    cluster,
    dedup,
    external_score,
    image_quality,
    metadata,
    neg_clip_loss,
    norm_sim,
    semdedup,
    weight,
)
from clipsift.filters.base import Filter, make_filter  # noqa: F401  (make_filter: build one of them from recipe params)


@functools.cache
def known_filters() -> dict[str, type[Filter]]:
    """Every registered filter by name (as registered when first asked)."""
    return dict(base.REGISTRY)
