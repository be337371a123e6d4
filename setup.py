"""Builds as pyproject.toml says, and records in the built package which code it holds
(tasks/build_record.json: the checkout's commit and changes, or the image's build arguments,
and the lock's hash), because an installed package has no git checkout to ask
(tasks/provenance.py)."""

import json
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithRecord(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install runs from its checkout: git knows
            return
        sys.path.insert(0, str(HERE))
        from tasks.provenance import build_record  # standard library only at import

        out = Path(self.build_lib) / "tasks" / "build_record.json"
        out.write_text(json.dumps(build_record(HERE), indent=2) + "\n")


setup(cmdclass={"build_py": BuildPyWithRecord})
