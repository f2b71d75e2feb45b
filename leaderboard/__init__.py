"""Leaderboard server, web page and submission client."""
