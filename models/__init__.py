"""Model manifest and fetcher: every model file the product runs, verified by checksum.

The model files themselves are never committed; `appliance models fetch` puts them in a model
directory (``models/files`` in a source checkout, ``/opt/classroom-attendance/current/models``
on a device: the installed release's own, :func:`default_model_dir`) and :func:`model_path`
hands out verified paths to the code that loads them.
"""

from models.fetcher import (
    DEFAULT_MODEL_DIR,
    ModelError,
    ModelSpec,
    default_model_dir,
    fetch_all,
    load_manifest,
    model_path,
    verify,
)

__all__ = [
    "DEFAULT_MODEL_DIR",
    "ModelError",
    "ModelSpec",
    "default_model_dir",
    "fetch_all",
    "load_manifest",
    "model_path",
    "verify",
]
