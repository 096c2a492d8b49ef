"""MaX-DeepLab for TensorFlow 2: end-to-end panoptic segmentation with mask transformers.

This top-level package imports nothing heavy: verbs such as `pq` and `synthetic` must run
without TensorFlow. Import sub-packages (`max_deeplab.model`, `max_deeplab.losses`, ...)
for the library API.
"""

__version__ = "0.1.0"
