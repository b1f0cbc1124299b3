"""The user guide's import path for conversion: ``from lema.utils.model_utils import prepare_monolithic_safetensors``.

The implementation lives in :mod:`lema.app.tools.convert`; this module only re-exports it.
"""

from lema.app.tools.convert import prepare_monolithic_safetensors

__all__ = ["prepare_monolithic_safetensors"]
