"""`bitbasis data`: paths of the built-in text."""
from __future__ import annotations


def run(a) -> int:
    from .. import data
    if a.which == "split":
        for role, plays in data.SPLIT.items():
            print(f"{role}: {', '.join(plays)}")
        return 0
    path = data.text_file(a.which)
    print(path)
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="paths of the built-in text (shakespeare plays)")
    d.add_argument("which", choices=["eval", "calib", "split"])
    d.set_defaults(func=run)
