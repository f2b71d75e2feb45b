"""Zero-shot evaluation suites, metrics and aggregates."""
