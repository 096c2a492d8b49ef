"""The bundled gin configs (this directory; installed as `max_deeplab.configs`) and `load`,
which applies one to the gin state as the verbs' ``--gin_file`` / ``--gin_bindings`` do:

    import max_deeplab.configs
    from max_deeplab.model import build_model

    max_deeplab.configs.load("max_deeplab_s_coco_641.gin")
    model = build_model()

`load` registers every configurable and resolves ``include``s against this directory, so
plain `gin.parse_config_file` is not needed (it would not find the included files, nor know
the configurables of modules not yet imported). See `max_deeplab.gin_config.load`.
"""
from max_deeplab.gin_config import CONFIGS_DIR, GinConfigError, load

__all__ = ["CONFIGS_DIR", "GinConfigError", "load"]
