"""Build libavg_edge.so with cffi's embedding mode.

    python -m avg_edge.runtime.capi.compile [--out build/capi]

The library embeds this Python: its init code adds the site-packages folders of the
interpreter that built it (so the avg_edge package and its dependencies are found
without the host setting PYTHONPATH), and an rpath to libpython.  Rebuild it after
moving or recreating the virtualenv.
"""

from __future__ import annotations

import argparse
import re
import shutil
import site
import sys
import sysconfig
import tempfile
from importlib.resources import files
from pathlib import Path

# The header ships inside the package (the wheel carries it); a regular install has it on disk.
HEADER = Path(str(files("avg_edge").joinpath("include", "avg_edge.h")))
MODULE = "_avg_edge_capi"


def cdef_from_header(header: Path = HEADER) -> str:
    """The declarations between BEGIN CDEF and END CDEF: one source for C users and cffi."""
    text = header.read_text()
    start, end = text.index("/* BEGIN CDEF"), text.index("/* END CDEF */")
    block = text[text.index("\n", start) + 1:end]
    return re.sub(r"/\*.*?\*/", "", block, flags=re.S)


def c_prelude(site_dirs: list[str]) -> str:
    """C code compiled into the library.  cffi imports its `_cffi_backend` module before
    any init code runs, so the site-packages folders must already be on the embedded
    interpreter's path: a load-time constructor prepends them to PYTHONPATH and sets
    PYTHONHOME to the Python it was built with, unless the host set one (both are read
    when Python starts and ignored when the host already runs Python)."""
    path = ":".join(site_dirs)
    home = sys.base_prefix
    if '"' in path + home or "\\" in path + home:
        raise ValueError(f"site-packages path with quotes or backslashes is not supported: {path!r}")
    return (
        "#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n#include \"avg_edge.h\"\n"
        "__attribute__((constructor)) static void avg_edge_python_path(void) {\n"
        f"    if (getenv(\"PYTHONHOME\") == NULL) {{ setenv(\"PYTHONHOME\", \"{home}\", 1); setenv(\"AVG_EDGE_SET_HOME\", \"1\", 1); }}\n"
        f"    const char *mine = \"{path}\";\n"
        "    const char *old = getenv(\"PYTHONPATH\");\n"
        "    if (old != NULL) setenv(\"AVG_EDGE_OLD_PATH\", old, 1);\n"
        "    if (old == NULL || *old == 0) { setenv(\"PYTHONPATH\", mine, 1); return; }\n"
        "    size_t n = strlen(mine) + strlen(old) + 2;\n"
        "    char *both = malloc(n);\n"
        "    if (both == NULL) return;\n"
        "    snprintf(both, n, \"%s:%s\", mine, old);\n"
        "    setenv(\"PYTHONPATH\", both, 1);\n"
        "    free(both);\n"
        "}\n"
    )


def init_code(site_dirs: list[str]) -> str:
    # Once Python runs, put the host's environment back as it was, so processes the host
    # starts later do not inherit our PYTHONHOME/PYTHONPATH.
    return (
        "import os, site\n"
        "if os.environ.pop('AVG_EDGE_SET_HOME', None):\n"
        "    os.environ.pop('PYTHONHOME', None)\n"
        "_old = os.environ.pop('AVG_EDGE_OLD_PATH', None)\n"
        "if _old is None:\n"
        "    os.environ.pop('PYTHONPATH', None)\n"
        "else:\n"
        "    os.environ['PYTHONPATH'] = _old\n"
        f"for _d in {site_dirs!r}:\n"
        "    site.addsitedir(_d)\n"
        f"from {MODULE} import ffi, lib\n"
        "from avg_edge.runtime.capi.impl import install\n"
        "install(ffi, lib)\n"
    )


def build_library(out_dir: Path) -> Path:
    import cffi

    out_dir.mkdir(parents=True, exist_ok=True)
    ffi = cffi.FFI()
    ffi.embedding_api(cdef_from_header())
    ffi.cdef("void *malloc(size_t); void free(void *);")
    libdir = sysconfig.get_config_var("LIBDIR")
    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    ffi.set_source(MODULE, c_prelude(dirs), include_dirs=[str(HEADER.parent)], extra_link_args=[f"-Wl,-rpath,{libdir}"])
    ffi.embedding_init_code(init_code(dirs))
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(ffi.compile(tmpdir=tmp, target="libavg_edge.*", verbose=False))
        target = out_dir / built.name
        shutil.move(str(built), target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)   # never a half-written library
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build") / "capi")
    args = ap.parse_args()
    path = build_library(args.out)
    print(path)


if __name__ == "__main__":
    sys.exit(main())
