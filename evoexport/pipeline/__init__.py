"""The encoder split at the prune points: stage and selection graphs, and the one way to
run a chain of them in PyTorch (stages.py: Pipeline)."""
