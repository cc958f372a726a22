"""gvmrt: a rootless, OCI-style container runtime for autonomous AI agents."""

__version__ = "0.1.0"
# The OCI runtime-spec version gvmrt implements and writes in `gvmrt spec` and `gvmrt state`.
OCI_VERSION = "1.2.0"
