"""How `meetara` talks: rich consoles, one-line errors, and the app runner.

Everything printed through rich is markup unless escaped: a message that holds brackets (pip extras
such as `meetara[cloud]`, lists, a user's own text, an exception's text) must go through `escape` or
`print(..., markup=False)`, or rich eats the brackets. `fail` and the app runner (train/cli.py, shared
with `python -m train`) escape what they print.
"""

from __future__ import annotations

from train.cli import fail, run_app

# shared with `python -m train` (which must not import launcher)
__all__ = ["EXIT_DECLINED", "console", "escape", "fail", "print_whole", "run_app", "say", "version"]
EXIT_DECLINED = 0  # the user answered "no" to a confirmation: nothing was done, and nothing failed


def console(stderr: bool = False):
    """A rich console; when output goes to a file or pipe, wide enough that tables keep one row per line."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=160)


def print_whole(renderable: object, *, stderr: bool = False) -> None:
    """Print a table: on a terminal it fits the screen; piped or redirected there is no screen, so it
    prints at its natural width (never cut or folded names that a script reads back)."""
    from rich.console import Console

    c = Console(stderr=stderr)
    if not c.is_terminal:
        unbounded = c.options.update_width(1_000_000)  # measure() is clamped to the options' width
        c = Console(stderr=stderr, width=max(c.width, c.measure(renderable, options=unbounded).maximum))
    c.print(renderable)


def escape(text: object) -> str:
    """`text` as rich markup that prints verbatim (brackets kept)."""
    from rich.markup import escape as _escape

    return _escape(str(text))


def say(message: object, *, stderr: bool = True) -> None:
    """Print one plain line (no markup, no highlighting, no wrapping) through rich."""
    from rich.console import Console

    Console(stderr=stderr).print(str(message), markup=False, highlight=False, soft_wrap=True)


def version() -> str:
    """meetara's installed version (the service layer's `api.version`)."""
    from launcher.api import version as installed

    return installed()
