"""The values of a user's rows, checked before they reach a teacher: ids unique, labels class ids,
split names known, inputs finite. Each problem is one DistillError naming a count, examples and the fix."""

from __future__ import annotations

import numpy as np

from pipeline.errors import DistillError

_SHOWN = 5  # offending values named in an error


def split_values(values: np.ndarray, column: str, uri: str) -> np.ndarray:
    """A split column's values, which must be `train` or `val`."""
    out = np.asarray([str(v) for v in values], dtype=object)
    other = sorted(set(out.tolist()) - {"train", "val"})
    if other:
        raise DistillError(f"split column {column!r} of {uri} holds {other[:_SHOWN]}, not only 'train' and 'val'",
                           "write `train` or `val` in every row (or split by `val_fraction` instead)")
    return out


def check_unique_ids(ids: np.ndarray, where: str) -> None:
    """The cache holds every sample_id exactly once: duplicates are refused, the first few named."""
    values, counts = np.unique(np.asarray([str(i) for i in ids]), return_counts=True)
    dup = values[counts > 1]
    if len(dup):
        shown = ", ".join(repr(str(v)) for v in dup[:_SHOWN])
        raise DistillError(f"{where} has {len(dup)} duplicate id(s) ({int(counts[counts > 1].sum())} rows), e.g. {shown}",
                           "give every row its own id: a cache holds every sample_id exactly once")


def class_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64 class ids 0..C-1; strings, fractions and negatives are one error with examples."""
    if labels.dtype.kind in "OUS":
        examples = ", ".join(repr(v) for v in list(dict.fromkeys(labels.tolist()))[:_SHOWN])
        raise DistillError(f"labels in {where} are not integers ({examples})",
                           "map each class to an integer id 0..C-1 before exporting the table")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
        raise DistillError(f"labels in {where} are not whole numbers (e.g. {labels[labels != np.round(labels)][:_SHOWN].tolist()})",
                           "labels are class ids 0..C-1")
    out = labels.astype(np.int64)
    if len(out) and out.min() < 0:
        raise DistillError(f"labels in {where} include negative values (e.g. {out[out < 0][:_SHOWN].tolist()})",
                           "labels are class ids 0..C-1")
    return out


def nonfinite_rows(columns: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """Per row, whether any input value is NaN or infinite (one column of lists, or scalar columns)."""
    n = len(columns[names[0]])
    bad = np.zeros(n, dtype=bool)
    for name in names:
        values = columns[name]
        if values.dtype == object:  # a list column: one array per row
            bad |= np.fromiter((not np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values), bool, n)
        elif values.dtype.kind == "f":
            bad |= ~np.isfinite(values.reshape(n, -1)).all(axis=1)
    return bad


def nonfinite_error(rows: int, total: int, example: str | None, uri: str, batch: bool = False) -> DistillError:
    where = f"{rows} of {total} rows in a batch of" if batch else f"{rows} of {total} rows of"
    return DistillError(f"{where} {uri} hold non-finite input values (NaN or inf), e.g. row {example!r}",
                        "fix or drop those rows, or set `source.nonfinite_inputs: zero` to read them as 0")
