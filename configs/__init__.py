"""Packaged YAML/JSON configuration: scales, filter recipes, eval suites, model configs, runs."""
