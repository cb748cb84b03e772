"""``python -m raydfml``: the same command line as ``launch.py`` (also installed as ``raydfml``)."""
from .cli import cli

if __name__ == "__main__":
    cli()
