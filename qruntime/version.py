"""The version of qruntime (also in pyproject.toml; tests/test_build.py checks they agree)."""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """qruntime's, torch's and transformers' versions (what a checkpoint or a result was made with)."""
    import torch

    found = {"qruntime": __version__, "torch": torch.__version__}
    try:
        import transformers

        found["transformers"] = transformers.__version__
    except ImportError:  # a dependency, but the version record must not need it
        pass
    return found
