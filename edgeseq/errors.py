"""Errors meant for people: each names the file and what was expected and found."""


class EdgeseqError(Exception):
    """A problem with the user's input (a file, an option, a state). The CLI prints it and exits 1."""


class UnsupportedError(EdgeseqError):
    """A valid input that edgeseq does not support (yet)."""
