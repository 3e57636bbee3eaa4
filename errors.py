"""One exception root, one category per exception class, and ONE table from category to
exit code, HTTP status and C return code.  The CLI, the server and the C ABI read their
codes from `CATEGORIES`; README's error table and include/avg_edge.h are checked against
it by the tests.

Messages say what was expected, what came, and (where one exists) a hint.
Torch-free: the runtime imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    name: str
    exit_code: int          # avg-run, avg-export, avg-serve (startup)
    http_status: int        # avg-serve
    c_code: int             # libavg_edge.so (AVG_EDGE_ERR_*)
    c_name: str
    meaning: str

    @property
    def client_error(self) -> bool:
        return 400 <= self.http_status < 500


# C return codes (include/avg_edge.h); AVG_EDGE_OK is 0.
C_OK = 0
CATEGORIES: dict[str, Category] = {c.name: c for c in (
    Category("usage", 2, 400, 1, "AVG_EDGE_ERR_ARGUMENT",
             "a bad option, argument or request field; a missing optional extra"),
    Category("build", 1, 500, 2, "AVG_EDGE_ERR_BUILD",
             "a build folder or checkpoint is missing, incomplete, corrupt or of another format"),
    Category("image", 1, 400, 3, "AVG_EDGE_ERR_IMAGE", "the image could not be read"),
    Category("failed", 1, 500, 4, "AVG_EDGE_ERR_RUNTIME",
             "a job ran and failed: inference, export, validation, quantization"),
    Category("cancelled", 130, 499, 5, "AVG_EDGE_ERR_CANCELLED",
             "stopped by the caller (Ctrl-C, the token callback, a client that went away)"),
    Category("internal", 1, 500, 6, "AVG_EDGE_ERR_INTERNAL", "a bug: please report the message"),
    Category("limit", 1, 422, 7, "AVG_EDGE_ERR_LIMIT",
             "the input is beyond what the build holds (context length, crops)"),
    Category("busy", 1, 503, 8, "AVG_EDGE_ERR_BUSY",
             "no room now (the server's queue is full, a call on a context that is already running)"),
)}


class AvgEdgeError(Exception):
    """Root of every error avg-edge raises deliberately."""

    category = "failed"


class UsageError(AvgEdgeError, ValueError):
    """A command-line option or call argument is wrong."""

    category = "usage"


class InputError(UsageError):
    """A call received an argument outside what it accepts."""


class MissingExtra(UsageError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, what: str, extra: str, module: str) -> None:
        super().__init__(f"{what} needs the '{extra}' extra ({module} is not installed): "
                         f"pip install 'avg-edge[{extra}]'")
        self.extra = extra


class BackendUnavailable(UsageError):
    """A backend was asked for that cannot run here (no TensorRT, no GPU)."""


class ConfigError(AvgEdgeError, ValueError):
    """A config.json value is missing or invalid (also a ValueError)."""

    category = "build"


class CheckpointError(AvgEdgeError):
    """A checkpoint folder is incomplete, or its weights do not match the model."""

    category = "build"


class BuildFolderError(AvgEdgeError):
    """A build folder is missing, incomplete, corrupt or of another format."""

    category = "build"


class ImageError(AvgEdgeError, ValueError):
    """An image could not be read or is not usable."""

    category = "image"


class LimitError(AvgEdgeError, ValueError):
    """The input is valid but beyond what this build holds (context, crops)."""

    category = "limit"


class BackendError(AvgEdgeError):
    """A backend could not be created or could not run a graph."""


class BuildError(AvgEdgeError):
    """A build ran and failed (exporter, validation beyond tolerance, quantization)."""


class Cancelled(AvgEdgeError):
    """Stopped by the caller."""

    category = "cancelled"


class Busy(AvgEdgeError):
    """No room to take this request now."""

    category = "busy"


def markdown_table() -> str:
    """README's error table, from CATEGORIES (python -m avg_edge.errors prints it)."""
    rows = ["| category | meaning | exit code | HTTP | C return code |", "|---|---|---|---|---|"]
    for c in CATEGORIES.values():
        rows.append(f"| `{c.name}` | {c.meaning} | {c.exit_code} | {c.http_status} | `{c.c_name}` ({c.c_code}) |")
    return "\n".join(rows) + "\n"


def category_of(e: BaseException) -> Category:
    """The category of any exception: ours by class, KeyboardInterrupt is cancelled,
    anything else is internal."""
    if isinstance(e, AvgEdgeError):
        return CATEGORIES[e.category]
    if isinstance(e, KeyboardInterrupt):
        return CATEGORIES["cancelled"]
    return CATEGORIES["internal"]


def one_line(e: BaseException) -> str:
    """The message for a user: ours as written, anyone else's with its type and a hint."""
    if isinstance(e, AvgEdgeError):
        return str(e) or type(e).__name__
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"internal: {type(e).__name__}: {e} (please report; AVG_EDGE_TRACEBACK=1 shows where)"


if __name__ == "__main__":
    print(markdown_table(), end="")
