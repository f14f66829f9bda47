"""The command-line reference (docs/cli.md) is generated from the parser and must match it."""

import argparse
from pathlib import Path

import pytest

from torchcaps.cli import _args, build_parser, docs

README = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _parsers(parser, name="torchcaps"):
    yield name, parser
    for sub_name, sub in _args.subcommands(parser).items():
        yield from _parsers(sub, f"{name} {sub_name}")


def test_readme_cli_section_is_generated_from_the_parser():
    text = README.read_text()
    assert docs.update(text, docs.render()) == text, (
        "docs/cli.md is out of date: run `python -m torchcaps.cli.docs`")
    assert docs.main([str(README), "--check"]) == 0


def test_every_command_and_option_is_documented():
    section = README.read_text().split(docs.START)[1].split(docs.END)[0]
    for name, parser in _parsers(build_parser()):
        if name != "torchcaps":
            assert f"### `{name}`" in section, name
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help is argparse.SUPPRESS:  # hidden: only `evaluate --suite`, a pointer
                assert (name, action.dest) == ("torchcaps evaluate", "suite")
                continue
            assert action.help, f"{name} {action.dest} has no help"
            assert f"`{docs._argument(action)}`" in section, (name, action.dest)


def test_help_shows_defaults():
    train = _args.subcommands(build_parser())["train"]
    text = train.format_help()
    for shown in ("(default: capsnet)", "(default: 128)", "(default: 0.001)", "(default: 0)",
                  "(default: 3 for mnist-mini, 10 for mnist)", "(default: runs/MODEL)"):
        assert shown in " ".join(text.split()), shown


def test_update_replaces_only_the_marked_section(tmp_path):
    before = f"# title\n\nkept\n\n{docs.START}\nold\n{docs.END}\n\nalso kept\n"
    after = docs.update(before, "new\n")
    assert after == f"# title\n\nkept\n\n{docs.START}\nnew\n{docs.END}\n\nalso kept\n"
    path = tmp_path / "README.md"
    path.write_text(before)
    assert docs.main([str(path), "--check"]) == 1 and path.read_text() == before
    assert docs.main([str(path)]) == 0 and docs.main([str(path), "--check"]) == 0
    with pytest.raises(ValueError, match="cli:start"):
        docs.update("no markers\n", "new\n")
