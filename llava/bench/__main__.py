"""``python -m llava.bench``: see :mod:`llava.bench.cli`."""

from llava.bench.cli import main

if __name__ == "__main__":
    main()
