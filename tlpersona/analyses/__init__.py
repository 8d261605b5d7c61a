"""Analyses that read an activation store (comparison, controls, subspace, patching)."""
