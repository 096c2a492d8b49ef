"""Inference: panoptic post-processing (paper §3.1), SavedModel export and prediction."""
from max_deeplab.inference.export import export_saved_model
from max_deeplab.inference.postprocess import postprocess

__all__ = ["export_saved_model", "postprocess"]
