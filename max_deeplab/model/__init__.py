"""MaX-DeepLab network: `build_model()` (gin-configured) and checkpoint `restore()`."""
from max_deeplab.model.checkpoints import restore
from max_deeplab.model.encoder import MaXDeepLabEncoder
from max_deeplab.model.max_deeplab import MaXDeepLab, batch_norm_layer, build_model
from max_deeplab.model.outputs import OUTPUT_KEYS

__all__ = ["OUTPUT_KEYS", "MaXDeepLab", "MaXDeepLabEncoder", "batch_norm_layer", "build_model",
           "restore"]
