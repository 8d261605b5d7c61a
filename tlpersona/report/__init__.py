"""Rendering: typed results into markdown reports and figures (no model, no store writes)."""
