"""Packaging hook: ship the C++/CUDA sources inside the wheel.

fastlm compiles its C++ kernels on first use (torch.utils.cpp_extension.load, cached),
so the build needs no torch and pip's isolated build environment never pulls one.
The sources live in the top-level ``csrc/``; an editable install reads them there, and
this hook copies them to ``fastlm/csrc`` in a regular wheel.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        source = Path(__file__).parent / "csrc"
        target = Path(self.build_lib) / "fastlm" / "csrc"
        shutil.copytree(source, target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithSources})
