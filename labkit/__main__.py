"""The `labkit` command: `labkit grade ...`, `labkit make-labs ...`, `labkit bench ...`, `labkit autograder ...`,
`labkit new-lab ...`.

Each subcommand is the same as `python -m labkit.<module>` with the same arguments.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"grade": "labkit.grade", "make-labs": "labkit.make_labs", "bench": "labkit.bench",
            "autograder": "labkit.autograder", "new-lab": "labkit.new_lab"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: labkit {{{','.join(COMMANDS)}}} [arguments]  (see labkit <command> --help)")
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
