"""The `domex` command: each subcommand is wired to a function that lives in its own module."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="domex", description=__doc__)
    parser.add_subparsers(dest="command", metavar="COMMAND")
    args = parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
