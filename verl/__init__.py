"""verl: reinforcement learning for large language models in the HybridFlow style."""
import importlib
import os

from verl.version import __version__

__all__ = ["DataProto", "__version__"]


def __getattr__(name: str):
    # DataProto is imported lazily so that ``import verl`` stays cheap for tools that only need submodules.
    if name == "DataProto":
        from verl.protocol import DataProto

        return DataProto
    raise AttributeError(f"module 'verl' has no attribute {name!r}")


def _import_external_modules() -> None:
    """Import plugin modules named in ``VERL_USE_EXTERNAL_MODULES`` (comma list) so they can register themselves."""
    for module_name in filter(None, (m.strip() for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(","))):
        try:
            importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"VERL_USE_EXTERNAL_MODULES names {module_name!r}, which cannot be imported: {exc}. "
                              "Install it or remove it from the environment variable.") from exc


_import_external_modules()
