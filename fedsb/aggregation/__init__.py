"""Aggregation: the rules that combine validated client vectors (mean, median, trimmed mean) and the reply checks."""
