"""Annotator consensus per taxonomy level: votes, Dawid-Skene with the model as a witness, path decoding, flags, report."""

__all__ = [
    "consensus",
    "dawid_skene",
    "findings",
    "flags",
    "path_decode",
    "report",
    "types",
    "votes",
]
