"""Per-row tensor columns of a cache, in plain pyarrow.

Shards hold Arrow's canonical fixed-shape tensor type (`arrow.fixed_shape_tensor`), which pyarrow,
DuckDB, Polars and any Arrow reader know without our code or Ray. Caches written before that hold
Ray Data's tensor extension types (`ray.data.arrow_tensor`, `ray.data.arrow_tensor_v2`): a
`large_list` (or `list`) of values with the row shape as JSON in the field's extension metadata.
Both read here without importing Ray: where Ray has registered its types in this process the
column arrives as Ray's extension type, elsewhere as the bare list with the metadata beside it.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

# Ray Data's tensor types: extension name -> the class whose `str()` manifests of caches written by
# Ray recorded as the column type, e.g. "ArrowTensorTypeV2(shape=(10,), dtype=halffloat)".
RAY_TENSOR_TYPES = {"ray.data.arrow_tensor": "ArrowTensorType", "ray.data.arrow_tensor_v2": "ArrowTensorTypeV2"}
_EXT_NAME, _EXT_META = b"ARROW:extension:name", b"ARROW:extension:metadata"


def tensor_array(values: np.ndarray) -> pa.Array:
    """Rows of an (N, *shape) array as Arrow's canonical fixed-shape tensor column."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))


def _ray_name(field: pa.Field) -> str | None:
    """The Ray tensor type of a field read where Ray's types are not registered, else None."""
    name = (field.metadata or {}).get(_EXT_NAME, b"").decode()
    return name if name in RAY_TENSOR_TYPES else None


def type_name(field: pa.Field) -> str:
    """The column's type as a manifest records it, the same whether or not Ray is imported here."""
    if _ray_name(field):  # Ray's type, unregistered: the bare list, with the row shape beside it
        name, value_type = _ray_name(field), field.type.value_type
    elif isinstance(field.type, pa.ExtensionType) and field.type.extension_name in RAY_TENSOR_TYPES:
        name, value_type = field.type.extension_name, field.type.storage_type.value_type
    else:
        return str(field.type)
    return f"{RAY_TENSOR_TYPES[name]}(shape={tuple(row_shape(field) or ())}, dtype={value_type})"


def row_shape(field: pa.Field) -> list[int] | None:
    """The per-row shape of a tensor column, None for a scalar one."""
    if isinstance(field.type, pa.FixedShapeTensorType):
        return list(field.type.shape)
    if _ray_name(field):
        return [int(n) for n in json.loads(field.metadata[_EXT_META])]
    if isinstance(field.type, pa.ExtensionType) and field.type.extension_name in RAY_TENSOR_TYPES:
        return [int(n) for n in field.type.shape]
    return None


def to_numpy(column: pa.Array | pa.ChunkedArray, field: pa.Field) -> np.ndarray:
    """A column as one array: (N, *row_shape) for a tensor column, (N,) for a scalar one.

    The result may be a read-only view of Arrow's buffers.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array.type, pa.FixedShapeTensorType):
        return array.to_numpy_ndarray()
    shape = row_shape(field)
    if shape is None:
        return array.to_numpy(zero_copy_only=False)
    storage = array.storage if isinstance(array, pa.ExtensionArray) else array
    values = storage.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(storage), *shape)


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Every column of a table read from cache shards, by name."""
    return {f.name: to_numpy(table.column(f.name), f) for f in table.schema}
