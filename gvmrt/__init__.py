"""gvmrt: a rootless, OCI-style container runtime for autonomous AI agents."""

__version__ = "0.1.0"
# The OCI runtime-spec version gvmrt writes in `gvmrt spec` and `gvmrt state`; 1.1.0 because crun 1.8
# (Debian 12) refuses newer ones, and gvmrt reads nothing from 1.2 yet.
OCI_VERSION = "1.1.0"
