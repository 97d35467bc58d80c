"""Versions recorded in every checkpoint and artifact, so a result can be traced to its software."""

from importlib import metadata

_PACKAGES = ("edgesmith", "torch", "tokenizers", "safetensors")


def edgesmith_version() -> str:
    try:
        return metadata.version("edgesmith")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def versions(*extra: str) -> dict[str, str]:
    """Installed versions of edgesmith, torch and the file-format libraries (plus `extra`)."""
    out = {}
    for name in _PACKAGES + extra:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
