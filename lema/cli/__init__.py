"""The ``lema`` command line: a thin shell over the library.

Every command turns LEMA's errors into one ``Error: ...`` line and an exit status
(1: the plan does not fit; 2: bad input), never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from lema.cli.errors import LemaGroup

# One module per command; each defines a click command named like the module.
COMMANDS = ("plan", "convert", "train", "generate", "merge", "demo", "bench")


@click.group(cls=LemaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lema")
def main() -> None:
    """LEMA: fine-tune LoRA adapters on models larger than your GPU."""


for _name in COMMANDS:
    if importlib.util.find_spec(f"lema.cli.{_name}_cmd") is not None:
        _module = importlib.import_module(f"lema.cli.{_name}_cmd")
        main.add_command(getattr(_module, _name))
