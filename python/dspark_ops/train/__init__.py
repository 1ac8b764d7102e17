"""Drafter training (DeepSpec recipe): data from the target itself, DSpark / DFlash / EAGLE-3-style variants,
calibration of the confidence head (STS + offsets). Command line: ``dspark train-draft`` and ``dspark calibrate``."""
from .calibration import calibrate_drafter, collect_confidence
from .data import DataRecipe, Sample, build_prompts, heldout_prompts, load_samples, prepare_dataset
from .features import TargetFeatures
from .losses import LossWeights, drafter_losses, position_weights, soft_acceptance
from .trainer import (VARIANTS, TrainConfig, Trainer, build_drafter, default_target_layers, eagle3_ttt_logits,
                      init_distributed, init_from_drafter, plot_losses, response_draft_vocab,
                      sample_anchors, target_features)

__all__ = ["calibrate_drafter", "collect_confidence", "DataRecipe", "Sample", "build_prompts", "heldout_prompts",
           "load_samples", "prepare_dataset", "LossWeights", "drafter_losses", "position_weights", "soft_acceptance",
           "VARIANTS", "TrainConfig", "Trainer", "build_drafter", "default_target_layers", "eagle3_ttt_logits",
           "init_distributed", "init_from_drafter", "plot_losses", "response_draft_vocab", "sample_anchors",
           "TargetFeatures", "target_features"]
