"""Durable state: the one committer of `state_dir` records, and the crash model's fault points."""
