"""Checkpoints: ``format`` writes, reads and verifies the files; ``manager`` decides what to
resume from, when to save and what to keep. The trainer talks to the manager only."""

from pipeline.checkpoint.format import (
    LATEST,
    MANIFEST,
    Checkpoint,
    check_compatible,
    complete_checkpoints,
    find_resumable,
    load_generator,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_manifest,
    resolve_checkpoint,
    save_checkpoint,
    split_prefixed,
    step_dir_name,
    verify,
)
from pipeline.errors import CheckpointError

__all__ = [
    "LATEST",
    "MANIFEST",
    "Checkpoint",
    "CheckpointError",
    "check_compatible",
    "complete_checkpoints",
    "find_resumable",
    "load_generator",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "read_manifest",
    "resolve_checkpoint",
    "save_checkpoint",
    "split_prefixed",
    "step_dir_name",
    "verify",
]
