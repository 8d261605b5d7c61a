"""Floor 0: files, locks, input checks, result files and results sets. Imports nothing of
tlpersona but its errors and version."""
