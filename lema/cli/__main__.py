"""``python -m lema.cli``: the ``lema`` command (what ``torchrun -m lema.cli`` launches)."""

from lema.cli import main

if __name__ == "__main__":
    main()
