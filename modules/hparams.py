"""Loading a recipe's yaml so that a misspelled override or a missing key fails before any work.

HyperPyYAML already refuses an override that names no key of the yaml, but with a ``KeyError``
listing every key; a key the yaml lacks fails only where the recipe first reads it, possibly hours
into training. :func:`load_hparams` names the culprit and the fix instead, at start-up.
"""

import difflib
import re

import yaml
from hyperpyyaml import load_hyperpyyaml

UNKNOWN_OVERRIDE = re.compile(r"Override '(.+?)' not found in")  # HyperPyYAML's message


class HparamsError(ValueError):
    """A yaml or command line that does not fit the recipe."""


def load_hparams(hparams_file, overrides, required_keys):
    """The yaml's hyperparameters with the command-line overrides applied.

    Raises :class:`HparamsError`, before building any object of the yaml, for keys of
    ``required_keys`` that the yaml lacks and for an override that is not a key of the yaml
    (naming the closest key).
    """
    with open(hparams_file, encoding="utf-8") as fin:
        keys = [key.value for key, _ in yaml.compose(fin).value]  # nothing built yet
    missing = [key for key in required_keys if key not in keys]
    if missing:
        raise HparamsError(
            f"{hparams_file} lacks the key(s) {', '.join(missing)}, which this recipe reads; "
            "add them to the yaml (the yamls of the same recipe in hparams/ show each one)"
        )
    with open(hparams_file, encoding="utf-8") as fin:
        try:
            return load_hyperpyyaml(fin, overrides)
        except KeyError as error:
            unknown = UNKNOWN_OVERRIDE.match(str(error.args[0])) if error.args else None
            if unknown is None:
                raise
            key = unknown.group(1)
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise HparamsError(
                f"--{key} is not a hyperparameter of {hparams_file}{hint} "
                "(a command-line override can only change a key the yaml defines)"
            ) from None
