"""The package version, in one place: read by pyproject.toml, reports and ONNX provenance."""

__version__ = "0.1.0"
