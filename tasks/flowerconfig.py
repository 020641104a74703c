"""Flower's settings (``celery -A tasks flower --conf=tasks/flowerconfig.py``): basic auth whose
password is read from the file ``RINGSERVE_FLOWER_PASSWORD_FILE`` names, so that it never appears
on a command line (``ps``) or in this repository. Flower reads this file at every start, so a
new password takes effect when Flower restarts."""

import os
from pathlib import Path

FLOWER_USER = "ringserve"

_password_file = os.environ.get("RINGSERVE_FLOWER_PASSWORD_FILE", "")
basic_auth = [f"{FLOWER_USER}:{Path(_password_file).read_text().strip()}"] if _password_file else []
