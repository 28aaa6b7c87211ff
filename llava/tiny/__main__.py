"""``python -m llava.tiny``: the command of :mod:`llava.tiny.cli`."""

from llava.tiny.cli import main

main()
