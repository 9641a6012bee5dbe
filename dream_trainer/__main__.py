"""``python -m dream_trainer``: the ``dream-trainer`` command."""

from dream_trainer.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
