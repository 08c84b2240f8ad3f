"""The ``fssc`` command line.

Two halves, so a reader finds each beside what it runs:

* fssc/cli/runtime_commands.py: ``run``, ``serve``, ``check``, ``deal``, ``certs`` and ``keys status``, the
  parties' and the dealer's commands. They run on a runtime-only install (``pip install fssc``):
  nothing of the IR, the passes, torch or onnx, only the code generator that regenerates the
  data owner's and the dealer's programs from the manifest.
* fssc/cli/compiler_commands.py: ``export``, ``ir``, ``compile``, ``view``,
  ``demo``, ``bench``, which need ``pip install 'fssc[compiler]'``. The group
  imports that module only when one of them is asked for (or for ``fssc --help``),
  so ``fssc deal`` starts without torch or onnx.

Every user error is an :class:`FsscError`: one line on stderr naming the
problem, exit code 2, no traceback, and no partial output that looks
complete (files are written to a temporary name and renamed when done).
"""

from __future__ import annotations

import importlib
import sys

import click

from fssc import __version__
from fssc.cli.runtime_commands import certs, check, deal, keys, run, serve
from fssc.errors import FsscError, os_error_message, printable

COMPILER_MODULE = "fssc.cli.compiler_commands"
COMPILER_COMMANDS = ("bench", "compile", "demo", "export", "ir", "view")  # the names COMPILER_MODULE.COMMANDS holds
COMPILER_DEPENDENCIES = {
    "onnx",
    "onnxruntime",
    "torch",
    "torchvision",
    "networkx",
    "onnxscript",
}  # pyproject's [compiler]


class FsscGroup(click.Group):
    """The runtime's commands registered here; the compiler's loaded from COMPILER_MODULE when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMPILER_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMPILER_COMMANDS:
            return importlib.import_module(COMPILER_MODULE).COMMANDS[cmd_name]
        return super().get_command(ctx, cmd_name)


@click.group(cls=FsscGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fssc")
def cli():
    """fssc: compile ONNX graphs into secure two-party inference programs (FSS)."""
    from fssc.runtime.heap import keep_freed_memory

    keep_freed_memory()  # every fssc process, before its first large array (fssc/runtime/heap.py)


cli.add_command(run)
cli.add_command(serve)
cli.add_command(check)
cli.add_command(deal)
cli.add_command(certs)
cli.add_command(keys)


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="fssc", standalone_mode=False)
    except FsscError as e:
        click.echo(f"fssc: error: {printable(str(e))}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a path that cannot be written, a port in use, ...
        click.echo(f"fssc: error: {os_error_message(e)}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as e:  # a compiler command on a runtime-only install
        missing = (e.name or "").partition(".")[0]
        if missing not in COMPILER_DEPENDENCIES:
            raise
        click.echo(
            f"fssc: error: this command needs the compiler (no module {missing!r}): pip install 'fssc[compiler]'",
            err=True,
        )
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("fssc: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:  # bare `fssc`: the help text
        click.echo(e.format_message(), err=True)
        sys.exit(2)
    except click.UsageError as e:  # bad arguments: one line too, with where to look
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"fssc: error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"fssc: error: {e.format_message()}", err=True)
        sys.exit(2)
    except SystemExit:
        raise
    sys.exit(0)
