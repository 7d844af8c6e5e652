"""``python -m gesture.render``: see ``gesture.render.cli``."""

from gesture.render.cli import main

main()
