"""The command-line reference (docs/cli.md), generated from the parser.

    python -m torchcaps.cli.docs            # rewrite the section of docs/cli.md
    python -m torchcaps.cli.docs --check    # exit 1 if docs/cli.md differs from the parser

The section lies between the lines ``<!-- cli:start -->`` and ``<!-- cli:end -->``: one
table per command (argument, default, meaning), in the order ``torchcaps --help`` lists
them, so the reference can never describe a flag the command does not have.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import _args, build_parser

START, END = "<!-- cli:start -->", "<!-- cli:end -->"
_EXPLAINED = re.compile(r"\s*\(default: (.*)\)$")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _argument(action: argparse.Action) -> str:
    """How the argument is written, e.g. ``--lr-milestones STEP [STEP ...]``."""
    if action.metavar is not None:
        meta = action.metavar
    elif action.choices is not None:
        meta = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        meta = action.dest if not action.option_strings else action.dest.upper()
    if action.nargs == 0:
        shown = ""
    elif action.nargs == "+":
        shown = f"{meta} [{meta} ...]"
    elif action.nargs == "?":
        shown = f"[{meta}]"
    else:
        shown = meta
    if not action.option_strings:
        return shown
    return ", ".join(f"{o} {shown}".strip() for o in action.option_strings)


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%(" in text:  # argparse's own expansion of %(default)s, %(prog)s, ...
        text = text % dict(vars(action), prog=prog)
    return text


def _section(name: str, parser: argparse.ArgumentParser) -> list[str]:
    lines = [f"### `{name}`", ""]
    if parser.description:
        lines += [parser.description, ""]
    subs = _args.subcommands(parser)
    if subs:
        lines += [f"Subcommands: {', '.join(f'`{name} {s}`' for s in subs)}.", ""]
    rows = []
    for group in parser._action_groups:  # argparse keeps no public list of its arguments
        shown = [a for a in group._group_actions if a.help is not argparse.SUPPRESS
                 and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if shown and group.title not in ("positional arguments", "options", "optional arguments"):
            rows.append(f"| **{group.title}** | | |")
        for action in shown:
            text = _help(action, parser.prog)
            explained = _EXPLAINED.search(text)  # "(default: ...)" written into the help
            if explained:
                text, default = text[:explained.start()], explained.group(1)
            else:
                default = _args.default_text(action)
            rows.append(f"| `{_cell(_argument(action))}` | {_cell(default) if default else ''} "
                        f"| {_cell(text)} |")
    if rows:
        lines += ["| argument | default | meaning |", "|---|---|---|", *rows, ""]
    for sub_name, sub in subs.items():
        lines += _section(f"{name} {sub_name}", sub)
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown of every command (what goes between the markers)."""
    parser = parser or build_parser()
    lines = ["<!-- generated from the parser by `python -m torchcaps.cli.docs`: edit the help "
             "texts in src/torchcaps/cli/, then rerun it -->", "",
             "`torchcaps COMMAND --help` prints the same. Argument errors exit with code 2 "
             "before anything runs; a failure while running prints one line "
             "`torchcaps COMMAND: error: ...` and exits with code 2 (`TORCHCAPS_DEBUG=1` shows "
             "the traceback).", ""]
    for name, sub in _args.subcommands(parser).items():
        lines += _section(f"{parser.prog} {name}", sub)
    return "\n".join(lines).rstrip("\n") + "\n"


def update(text: str, rendered: str) -> str:
    """``text`` with the lines between the markers replaced by ``rendered``."""
    head, start, rest = text.partition(START + "\n")
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the file has no {START} ... {END} section")
    return f"{head}{START}\n{rendered}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m torchcaps.cli.docs",
                                description=__doc__.splitlines()[0])
    p.add_argument("readme", nargs="?", default="docs/cli.md", help="the file to update")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if the file's section differs")
    a = p.parse_args(argv)
    path = Path(a.readme)
    text = path.read_text()
    new = update(text, render())
    if a.check:
        if new != text:
            print(f"{path}: the command-line section is out of date; run "
                  "`python -m torchcaps.cli.docs`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new)
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
