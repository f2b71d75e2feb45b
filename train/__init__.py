"""Fixed training recipes per scale, launched through open_clip_train."""
