"""Allow ``python -m privlora``."""

from privlora.cli import app

app(prog_name="privlora")
