"""Typed errors. The library raises these; only `edgert.apps` prints them and exits."""


class EdgertError(Exception):
    """Base of every error edgert raises on purpose. The message says what to do."""


class FormatError(EdgertError):
    """A model file is missing, truncated, corrupt, or uses something edgert does not read."""


class UnsupportedError(FormatError):
    """A well-formed file that asks for an architecture, block type or feature edgert lacks."""


class ModelNotFoundError(EdgertError):
    """A model name that is neither a path nor a known downloadable model."""


class DownloadError(EdgertError):
    """Fetching or verifying a model failed."""


class OptionError(EdgertError):
    """A setting edgert cannot use (KV cache bits, an input file), with the values it accepts."""


class ContextError(EdgertError):
    """The prompt (plus what must be generated) does not fit the context window."""


class BudgetError(EdgertError):
    """The memory budget is below the minimum working set."""


class ClusterError(EdgertError):
    """A peer is unreachable, unauthorised, or stopped answering."""


class CacheError(EdgertError):
    """A file edgert keeps in its cache folder (the packed stream file) cannot be written."""


class CompileError(EdgertError):
    """Compiling the kernels ahead of a budgeted run failed."""
