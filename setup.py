"""Builds coltrain's C++ hardware datapath (hw/) into coltrain/numerics/hw/ at install.

The library is the default hardware plugin (see hw/include/coltrain/hw_plugin.h): XLA FFI
handlers compiled against the FFI headers of the pinned jaxlib (build-system requires in
pyproject.toml). It is loaded with ctypes, not imported as a Python module.

  COLTRAIN_HW_NATIVE=1 pip install -e .   also compiles with -march=native (opt-in: the
                                           default build runs on any x86-64 and picks
                                           AVX2 / AVX-512 VNNI kernels at run time).
"""

import glob
import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HW_SOURCES = sorted(glob.glob("hw/src/*.cc"))


class BuildHwDatapath(build_ext):
  """build_ext with jaxlib's FFI headers and a clear error when the build cannot work."""

  def build_extensions(self):
    compiler = self.compiler.compiler_so[0]
    if shutil.which(compiler) is None:
      raise SystemExit(
          f"coltrain: cannot build the hw/ C++ datapath: no C++ compiler ('{compiler}' not "
          f"found). Install g++ (>= 10) or clang (>= 12), e.g. `apt-get install g++`, then "
          f"rerun pip install.")
    try:
      import jax.ffi
      include = jax.ffi.include_dir()
    except ImportError as e:
      raise SystemExit(f"coltrain: building hw/ needs jaxlib's XLA FFI headers, but jax is "
                       f"not importable in the build environment ({e})") from None
    if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
      raise SystemExit(f"coltrain: jaxlib's FFI headers are missing from {include}")
    for ext in self.extensions:
      ext.include_dirs.append(include)
      if os.environ.get("COLTRAIN_HW_NATIVE") == "1":
        ext.extra_compile_args.append("-march=native")
    try:
      super().build_extensions()
    except Exception as e:  # setuptools' CompileError/LinkError
      raise SystemExit(f"coltrain: building the hw/ C++ datapath failed: {e}\nIt needs a "
                       f"C++20 compiler (g++ >= 10 or clang >= 12).") from None


setup(
    ext_modules=[
        Extension(
            "coltrain.numerics.hw._cpu_datapath",
            sources=HW_SOURCES,
            include_dirs=["hw/include", "hw/src"],
            language="c++",
            extra_compile_args=["-std=c++20", "-O3", "-fvisibility=hidden",
                                "-fno-math-errno"],
        )
    ],
    cmdclass={"build_ext": BuildHwDatapath},
)
