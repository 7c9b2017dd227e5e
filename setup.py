"""Build the Cython/C extensions. Metadata lives in pyproject.toml."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

INC = ["nmbridge/include"]
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function", "-Wno-format-truncation"]


def ext(name: str, pyx: str, *csrc: str) -> Extension:
    return Extension(name, [pyx, *(f"csrc/{c}" for c in csrc)],
                     include_dirs=INC, extra_compile_args=CFLAGS)


# One extension per module, from its .pyx and the hand-written C in csrc/; C that several
# need (umem.c) is compiled into each,
# since extension modules cannot link against each other's C symbols.
EXTENSIONS = [
    ext("nmbridge.port", "nmbridge/port.pyx", "umem.c"),
    ext("nmbridge.fastfwd", "nmbridge/fastfwd.pyx"),
    ext("nmbridge.capring", "nmbridge/capring.pyx", "tapring.c"),
    ext("nmbridge.backends.mem", "nmbridge/backends/mem.pyx", "umem.c", "memport.c"),
    ext("nmbridge.backends.afpacket", "nmbridge/backends/afpacket.pyx", "umem.c", "afpacket.c"),
    ext("nmbridge.backends.afxdp", "nmbridge/backends/afxdp.pyx", "umem.c", "afxdp.c"),
    ext("nmbridge.backends.netmap", "nmbridge/backends/netmap.pyx", "nmport.c"),
    ext("nmbridge.filters.engine", "nmbridge/filters/engine.pyx", "filter.c", "bpf.c"),
]
# Every listed source must be there: a missing one is a build error that names it, never an
# extension quietly left out of an install that then "succeeds" without it.
_HERE = Path(__file__).resolve().parent
_MISSING = [s for e in EXTENSIONS for s in e.sources if not (_HERE / s).is_file()]
if _MISSING:
    raise SystemExit("setup.py: error: extension source(s) missing from the build tree: "
                     + ", ".join(dict.fromkeys(_MISSING))
                     + " (a build from a copy of the project must include csrc/ and nmbridge/)")

setup(
    ext_modules=cythonize(
        EXTENSIONS,
        include_path=["."],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
