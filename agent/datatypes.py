"""Mapping between KServe v2 datatype names and NumPy dtypes.

The names and widths follow the Open Inference Protocol's tensor data types table.
"""

from __future__ import annotations

import numpy as np

KSERVE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

NUMPY_TO_KSERVE: dict[np.dtype, str] = {dtype: name for name, dtype in KSERVE_TO_NUMPY.items()}

# ONNX Runtime reports input types as strings such as "tensor(float)".
ONNX_TYPE_TO_KSERVE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def kserve_datatype(dtype: np.dtype | type) -> str:
    """Return the KServe datatype name of a NumPy dtype; raise ValueError if it has none."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_KSERVE[dtype]
    except KeyError:
        raise ValueError(f"NumPy dtype {dtype} has no KServe v2 datatype") from None


def numpy_dtype(datatype: str) -> np.dtype:
    """Return the NumPy dtype for a KServe datatype name; raise ValueError for unknown names."""
    try:
        return KSERVE_TO_NUMPY[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}; expected one of {', '.join(KSERVE_TO_NUMPY)}") from None
