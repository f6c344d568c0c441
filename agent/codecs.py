"""Conversion between KServe v2 protobuf tensors and NumPy arrays.

Two wire encodings exist for tensor data. ``raw_input_contents`` / ``raw_output_contents``
hold little-endian row-major bytes, one entry per tensor; BYTES elements are each prefixed
with a 4-byte little-endian length. ``InferTensorContents`` holds the elements in the typed
repeated field for the datatype. A request uses one encoding for all of its inputs.
"""

from __future__ import annotations

import struct
from typing import Iterable

import numpy as np

from edgeopt.agent.datatypes import KSERVE_TO_NUMPY, kserve_datatype
from edgeopt.agent.errors import InvalidInputError
from edgeopt.agent.protos import inference_pb2

# The typed InferTensorContents field for each datatype. FP16 and BF16 have none, so such
# tensors only travel as raw bytes.
TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_TYPED_FIELDS = tuple(sorted(set(TYPED_FIELD.values())))

# Wire dtypes are little-endian whatever the host's byte order.
_WIRE_DTYPE: dict[str, np.dtype] = {
    name: dtype.newbyteorder("<") for name, dtype in KSERVE_TO_NUMPY.items() if name != "BYTES"
}

_LENGTH_PREFIX = struct.Struct("<I")


def element_count(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _decode_raw_bytes_tensor(name: str, raw: bytes, count: int) -> np.ndarray:
    elements = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInputError(f"input {name!r}: BYTES raw contents end inside a 4-byte length prefix at offset {offset}")
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInputError(f"input {name!r}: BYTES element {len(elements)} declares {length} bytes but only {len(raw) - offset} remain")
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise InvalidInputError(f"input {name!r}: BYTES raw contents hold {len(elements)} elements, the shape needs {count}")
    array = np.empty(count, dtype=np.object_)
    array[:] = elements
    return array


def decode_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """Decode one tensor from its ``raw_input_contents`` entry; the byte count must match the shape."""
    count = element_count(shape)
    if datatype == "BYTES":
        return _decode_raw_bytes_tensor(name, raw, count).reshape(shape)

    dtype = _WIRE_DTYPE[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"input {name!r}: raw contents have {len(raw)} bytes, {datatype} shape {list(shape)} needs {expected} bytes"
        )
    array = np.frombuffer(raw, dtype=dtype)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise InvalidInputError(f"input {name!r}: BOOL raw contents must be bytes 0 or 1")
    return array.reshape(shape)


def decode_typed(name: str, datatype: str, shape: tuple[int, ...], contents: inference_pb2.InferTensorContents) -> np.ndarray:
    """Decode one tensor from its typed ``contents``; exactly the datatype's field may be set."""
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents")
    for other in _TYPED_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidInputError(f"input {name!r}: {datatype} data belongs in contents.{field}, but contents.{other} is set")

    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInputError(f"input {name!r}: contents.{field} has {len(values)} elements, {datatype} shape {list(shape)} needs {count}")

    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)

    dtype = KSERVE_TO_NUMPY[datatype]
    wide = np.asarray(values)
    if dtype.kind in "iu" and wide.size:
        limits = np.iinfo(dtype)
        if wide.min() < limits.min or wide.max() > limits.max:
            raise InvalidInputError(f"input {name!r}: a value in contents.{field} is outside the {datatype} range {limits.min}..{limits.max}")
    return wide.astype(dtype, copy=False).reshape(shape)


def _encode_bytes_element(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


def encode_outputs(response: inference_pb2.ModelInferResponse, outputs: dict[str, np.ndarray], raw: bool) -> None:
    """Append ``outputs`` to ``response`` as raw bytes or typed contents.

    Typed encoding falls back to raw for every output when one of them has no typed field
    (FP16), because a response uses one encoding for all outputs.
    """
    datatypes = {name: kserve_datatype(array.dtype) for name, array in outputs.items()}
    if not raw and any(dt not in TYPED_FIELD for dt in datatypes.values()):
        raw = True

    for name, array in outputs.items():
        datatype = datatypes[name]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)

        if datatype == "BYTES":
            elements = [_encode_bytes_element(v) for v in array.reshape(-1)]
            if raw:
                response.raw_output_contents.append(b"".join(_LENGTH_PREFIX.pack(len(e)) + e for e in elements))
            else:
                tensor.contents.bytes_contents.extend(elements)
        elif raw:
            response.raw_output_contents.append(np.ascontiguousarray(array, dtype=_WIRE_DTYPE[datatype]).tobytes())
        else:
            getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.reshape(-1).tolist())
