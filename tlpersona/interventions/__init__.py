"""Experiments that run the model: activation patching (exact and attribution), steering,
ablation and capping. Hook names (``blocks.{l}.hook_resid_post`` …) are the common language;
:class:`~tlpersona.interventions.runner.Runner` runs them on a bridged model."""
