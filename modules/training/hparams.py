"""Loading a recipe's yaml so that a misspelled override or a missing key fails before any work.

HyperPyYAML already refuses an override that names no key of the yaml, but with a ``KeyError``
listing every key; a key the yaml lacks fails only where the recipe first reads it, possibly hours
into training. :func:`load_hparams` names the culprit and the fix instead, at start-up.
"""

import difflib
import re

import yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references

UNKNOWN_OVERRIDE = re.compile(r"Override '(.+?)' not found in")  # HyperPyYAML's message
# Whole-number hyperparameters and their least value, checked where a yaml has them: several are read
# only at test time (test_beam_size, avg_checkpoints), where a wrong value would cost the whole training.
WHOLE_NUMBERS = {
    "number_of_epochs": 1,
    "avg_checkpoints": 1,
    "test_beam_size": 1,
    "valid_beam_size": 1,
    "batch_size": 1,
    "test_batch_size": 1,
    "grad_accumulation_factor": 1,
    "num_workers": 0,
    "nonfinite_patience": 0,
}


class HparamsError(ValueError):
    """A yaml or command line that does not fit the recipe."""


def load_hparams(hparams_file, overrides, required_keys):
    """The yaml's hyperparameters with the command-line overrides applied.

    Raises :class:`HparamsError`, before building any object of the yaml, for keys of
    ``required_keys`` that the yaml lacks and for an override that is not a key of the yaml
    (naming the closest key), and for a value of WHOLE_NUMBERS that is not a whole number or is
    below its least value.
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
            resolved = resolve_references(fin, overrides, overrides_must_match=True)  # text only, nothing built
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
    check_whole_numbers(yaml.compose(resolved), hparams_file)
    with open(hparams_file, encoding="utf-8") as fin:
        return load_hyperpyyaml(fin, overrides)


def check_whole_numbers(document, hparams_file):
    """Raises :class:`HparamsError` naming the first key of WHOLE_NUMBERS whose value in the yaml
    document (a node tree: nothing built) is not a whole number or is below its least value."""
    for key, node in document.value:
        least = WHOLE_NUMBERS.get(key.value)
        if least is None:
            continue
        if node.tag != "tag:yaml.org,2002:int" or int(node.value) < least:
            raise HparamsError(
                f"{key.value} must be a whole number of at least {least}, not {node.value}: "
                f"fix it in {hparams_file} or in the command line's --{key.value}"
            )
