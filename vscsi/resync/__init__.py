"""What pair copies and shadow-set copies share: pacing to the operator's copy rate."""
