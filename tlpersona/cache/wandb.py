"""Logging a store as a Weights & Biases artifact (optional: needs the wandb package)."""

from __future__ import annotations

from tlpersona.cache.reader import Store
from tlpersona.errors import TlpersonaError


def log_wandb(store: Store, project: str) -> str:
    """Log a store directory as a W&B artifact (type ``activation-store``, with its manifest as
    metadata); ``WANDB_MODE=offline`` keeps it local. Returns the artifact name."""
    try:
        import wandb
    except ImportError:
        raise TlpersonaError("`wandb_project` needs the wandb package") from None
    name = f"store-{store.manifest_hash[:12]}"
    run = wandb.init(project=project, job_type="extract", config=store.provenance,
                     dir=str(store.root.parent))
    try:
        artifact = wandb.Artifact(name, type="activation-store",
                                  metadata={"manifest_hash": store.manifest_hash})
        artifact.add_dir(str(store.root))
        run.log_artifact(artifact)
    finally:
        run.finish()
    return name
