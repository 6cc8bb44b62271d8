"""Errors the user can act on.

Every problem with user input is a ``CTInputError`` whose message is one line naming the file and the
problem; the command line prints it and exits with status 2 instead of showing a traceback.
"""


class RadiomicGANError(Exception):
    """Base of the project's own errors (anything else is a bug)."""


class CTInputError(RadiomicGANError):
    """A volume, folder or file the user gave cannot be used as CT input or output."""


class DatasetError(RadiomicGANError):
    """A manifest of training pairs is malformed or its pairs do not match."""


class TrainingError(RadiomicGANError):
    """Training settings that cannot train, or a model folder that cannot be trained into or resumed."""


class ModelError(RadiomicGANError):
    """A model folder that is missing, malformed, or does not match its architecture."""
