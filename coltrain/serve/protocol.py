"""The Open Inference Protocol (KServe v2) JSON tensors: parsing and responses.

Pure functions, no I/O; JSON is read and written with orjson (the stdlib parser only
words the errors). `parse_infer_request` turns a request body into an
`InferRequest` or raises `ProtocolError` (an HTTP 400) whose message says exactly what
is wrong; nothing else escapes it for any input bytes.

Request (KServe v2 JSON):
  {"id": "optional string",
   "parameters": {"deadline_ms": 25.0},                 # optional; default: the SLO
   "inputs": [{"name": "images", "shape": [n, H, W, C], "datatype": "FP32",
               "data": [... n*H*W*C numbers, row-major, flat or nested ...]}]}
  Pixels are in the dataset's units (0..255, as the uint8 training images); datatypes
  FP32, FP64, UINT8 and INT32 are accepted; 1 <= n <= max_images.
Response:
  {"model_name", "model_version", "id",
   "outputs": [{"name": "logits", "datatype": "FP32", "shape": [n, K], "data": [...]},
               {"name": "label", "datatype": "INT64", "shape": [n], "data": [...]}],
   "parameters": {"queue_ms", "compute_ms", "replica", "batch_size"}}

Binary tensor data (the protocol's binary extension, as Triton and KServe implement it):
  a request whose HTTP header `Inference-Header-Content-Length: L` is set carries its
  JSON in the body's first L bytes and raw tensor bytes after them; the input then has
  `"parameters": {"binary_data_size": B}` instead of `data`: B = n*H*W*C x the
  datatype's size, little-endian, row-major. An output is returned as raw bytes when
  the request asks (`"parameters": {"binary_data_output": true}` for all outputs, or
  `"outputs": [{"name": "logits", "parameters": {"binary_data": true}}]`): its JSON
  entry has `"parameters": {"binary_data_size": B}` and no `data`, its bytes follow the
  JSON in output order (logits float32, label int64, little-endian), and the response
  carries `Inference-Header-Content-Length` (`encode_infer_response`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

import numpy as np
import orjson

DATATYPES = {"FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8, "INT32": np.int32}
MAX_DEADLINE_MS = 60_000.0
OUTPUTS = {"logits": "FP32", "label": "INT64"}   # output name -> datatype, in order
HEADER_LENGTH = "inference-header-content-length"   # the binary extension's HTTP header


class ProtocolError(ValueError):
  """A malformed request (HTTP 400); the message is sent to the client."""


@dataclasses.dataclass(frozen=True)
class InferRequest:
  """A validated inference request: `images` float32 (n, H, W, C)."""
  images: np.ndarray
  id: Optional[str] = None
  deadline_ms: Optional[float] = None
  binary_outputs: frozenset = frozenset()   # output names to return as raw bytes


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def header_length(value: Optional[str]) -> Optional[int]:
  """The `Inference-Header-Content-Length` header's value as an int (None if absent);
  raises `ProtocolError` if it is not a non-negative integer."""
  if value is None:
    return None
  value = value.strip()
  if not value.isdigit():
    raise ProtocolError(f"'Inference-Header-Content-Length' must be a non-negative "
                        f"integer, got {value!r}")
  return int(value)


def parse_infer_request(body: bytes, *, image_shape: tuple[int, ...], max_images: int,
                        json_length: Optional[int] = None) -> InferRequest:
  """Parses and validates a KServe v2 inference request (see module docstring):
  `json_length` (the `Inference-Header-Content-Length`; None: the whole body is JSON)
  splits the body into its JSON and its binary tensor data."""
  binary = None
  if json_length is not None:
    if json_length > len(body):
      raise ProtocolError(f"'Inference-Header-Content-Length' is {json_length} but the "
                          f"body has only {len(body)} bytes")
    body, binary = body[:json_length], memoryview(body)[json_length:]
  try:
    obj = orjson.loads(body)
  except orjson.JSONDecodeError:
    # Slow path, errors only: the stdlib parser reads what orjson refuses (NaN,
    # Infinity, huge integers) so those get their precise message below, and it words
    # syntax errors more plainly.
    try:
      obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise ProtocolError(f"request body is not valid JSON: {e}") from None
  if not isinstance(obj, dict):
    raise ProtocolError(f"request must be a JSON object, got {type(obj).__name__}")
  req_id = obj.get("id")
  if req_id is not None and not isinstance(req_id, str):
    raise ProtocolError("'id' must be a string")
  params = obj.get("parameters", {})
  if not isinstance(params, dict):
    raise ProtocolError("'parameters' must be a JSON object")
  deadline = params.get("deadline_ms")
  if deadline is not None:
    if not _number(deadline) or not math.isfinite(deadline) or not (
        0 < deadline <= MAX_DEADLINE_MS):
      raise ProtocolError(f"'parameters.deadline_ms' must be a number in "
                          f"(0, {MAX_DEADLINE_MS:g}], got {deadline!r}")
    deadline = float(deadline)
  binary_outputs = _binary_outputs(params, obj.get("outputs"))
  inputs = obj.get("inputs")
  if not isinstance(inputs, list) or len(inputs) != 1:
    raise ProtocolError("'inputs' must be a list holding exactly one tensor (the images)")
  images = _parse_tensor(inputs[0], image_shape, max_images, binary)
  return InferRequest(images=images, id=req_id, deadline_ms=deadline,
                      binary_outputs=binary_outputs)


def _flag(params: dict, key: str, where: str) -> bool:
  value = params.get(key, False)
  if not isinstance(value, bool):
    raise ProtocolError(f"'{where}.{key}' must be true or false, got {value!r}")
  return value


def _binary_outputs(params: dict, outputs: Any) -> frozenset:
  """The output names the request wants as raw bytes (see module docstring)."""
  every = _flag(params, "binary_data_output", "parameters")
  if outputs is None:
    return frozenset(OUTPUTS) if every else frozenset()
  if not isinstance(outputs, list):
    raise ProtocolError("'outputs' must be a list")
  names = set(OUTPUTS) if every else set()
  for i, out in enumerate(outputs):
    if not isinstance(out, dict) or not isinstance(out.get("name"), str):
      raise ProtocolError(f"'outputs[{i}]' must be a JSON object with a 'name'")
    if out["name"] not in OUTPUTS:
      raise ProtocolError(f"'outputs[{i}].name' must be one of {list(OUTPUTS)}, got "
                          f"{out['name']!r}")
    p = out.get("parameters", {})
    if not isinstance(p, dict):
      raise ProtocolError(f"'outputs[{i}].parameters' must be a JSON object")
    if _flag(p, "binary_data", f"outputs[{i}].parameters"):
      names.add(out["name"])
  return frozenset(names)


def _parse_tensor(t: Any, image_shape: tuple[int, ...], max_images: int,
                  binary: Optional[memoryview] = None) -> np.ndarray:
  if not isinstance(t, dict):
    raise ProtocolError("'inputs[0]' must be a JSON object with name, shape, datatype, data")
  params = t.get("parameters", {})
  if not isinstance(params, dict):
    raise ProtocolError("'inputs[0].parameters' must be a JSON object")
  binary_size = params.get("binary_data_size")
  for key in ("name", "shape", "datatype") + (() if binary_size is not None else ("data",)):
    if key not in t:
      raise ProtocolError(f"'inputs[0]' is missing '{key}'" + (
          " (or 'parameters.binary_data_size' with binary data)" if key == "data" else ""))
  if not isinstance(t["name"], str):
    raise ProtocolError("'inputs[0].name' must be a string")
  dtype = t["datatype"]
  if dtype not in DATATYPES:
    raise ProtocolError(f"'inputs[0].datatype' must be one of {sorted(DATATYPES)}, "
                        f"got {dtype!r}")
  shape = t["shape"]
  expected = "[n, " + ", ".join(map(str, image_shape)) + "]"
  if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                             for d in shape)):
    raise ProtocolError(f"'inputs[0].shape' must be a list of integers {expected}")
  if len(shape) != 1 + len(image_shape) or tuple(shape[1:]) != tuple(image_shape):
    raise ProtocolError(f"'inputs[0].shape' must be {expected}, got {shape}")
  n = shape[0]
  if not 1 <= n <= max_images:
    raise ProtocolError(f"a request holds 1..{max_images} images, got shape[0] = {n}")
  if binary_size is not None:
    return _binary_tensor(t, shape, dtype, binary_size, binary)
  data = t["data"]
  if not isinstance(data, list):
    raise ProtocolError("'inputs[0].data' must be a list of numbers")
  try:
    arr = np.asarray(data, dtype=np.float64)
  except (ValueError, TypeError, OverflowError, RecursionError):
    raise ProtocolError("'inputs[0].data' must hold only numbers (flat or nested "
                        "consistently with 'shape')") from None
  size = math.prod(shape)
  if arr.ndim != 1 and arr.shape != tuple(shape):
    raise ProtocolError(f"'inputs[0].data' is nested as {list(arr.shape)}; send it flat "
                        f"(row-major) or nested exactly as shape {shape}")
  if arr.size != size:
    raise ProtocolError(f"'inputs[0].data' has {arr.size} values; shape {shape} needs {size}")
  if not np.isfinite(arr).all():
    raise ProtocolError("'inputs[0].data' holds a non-finite value (NaN or Infinity)")
  if dtype != "FP32" and dtype != "FP64":
    info = np.iinfo(DATATYPES[dtype])
    if np.any(arr != np.round(arr)) or arr.min() < info.min or arr.max() > info.max:
      raise ProtocolError(f"'inputs[0].data' values must be integers in "
                          f"[{info.min}, {info.max}] for datatype {dtype}")
  return arr.reshape(shape).astype(np.float32)


def _binary_tensor(t: dict, shape: list, dtype: str, size: Any,
                   binary: Optional[memoryview]) -> np.ndarray:
  if "data" in t:
    raise ProtocolError("'inputs[0]' has both 'data' and 'parameters.binary_data_size'")
  if binary is None:
    raise ProtocolError("'inputs[0].parameters.binary_data_size' needs binary data: send "
                        "the JSON length in the 'Inference-Header-Content-Length' header")
  little = np.dtype(DATATYPES[dtype]).newbyteorder("<")
  need = math.prod(shape) * little.itemsize
  if not isinstance(size, int) or isinstance(size, bool) or size != need:
    raise ProtocolError(f"'inputs[0].parameters.binary_data_size' must be {need} "
                        f"(shape {shape} of {dtype}), got {size!r}")
  if len(binary) != size:
    raise ProtocolError(f"the body holds {len(binary)} bytes of binary data after the "
                        f"JSON; 'binary_data_size' says {size}")
  arr = np.frombuffer(binary, little)
  if dtype in ("FP32", "FP64") and not np.isfinite(arr).all():
    raise ProtocolError("'inputs[0]' binary data holds a non-finite value (NaN or Infinity)")
  return arr.astype(np.float32).reshape(shape)


def dumps(obj: Any) -> bytes:
  """JSON bytes of a response object (orjson: numpy scalars and arrays allowed)."""
  return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _response_parts(*, model_name: str, version: int, req_id: Optional[str],
                    logits: np.ndarray, parameters: dict[str, Any],
                    binary_outputs: frozenset) -> tuple[dict[str, Any], list[bytes]]:
  """(response object, raw bytes of the outputs in `binary_outputs`, in output order)."""
  logits = np.ascontiguousarray(logits, np.float32)
  values = {"logits": logits, "label": np.argmax(logits, axis=-1).astype(np.int64)}
  outputs, blobs = [], []
  for name, datatype in OUTPUTS.items():
    x = values[name]
    out = {"name": name, "datatype": datatype, "shape": list(x.shape)}
    if name in binary_outputs:
      blobs.append(x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes())
      out["parameters"] = {"binary_data_size": len(blobs[-1])}
    else:
      out["data"] = x.ravel().tolist()
    outputs.append(out)
  obj = {"model_name": model_name, "model_version": str(version), "outputs": outputs,
         "parameters": parameters}
  if req_id is not None:
    obj["id"] = req_id
  return obj, blobs


def infer_response(*, model_name: str, version: int, req_id: Optional[str],
                   logits: np.ndarray, parameters: dict[str, Any],
                   binary_outputs: frozenset = frozenset()) -> dict[str, Any]:
  """The KServe v2 response object (the JSON part) for one request's `logits` (n, K):
  an output named in `binary_outputs` has `parameters.binary_data_size` instead of
  `data` (its bytes: `encode_infer_response`)."""
  return _response_parts(model_name=model_name, version=version, req_id=req_id,
                         logits=logits, parameters=parameters,
                         binary_outputs=binary_outputs)[0]


def encode_infer_response(*, model_name: str, version: int, req_id: Optional[str],
                          logits: np.ndarray, parameters: dict[str, Any],
                          binary_outputs: frozenset = frozenset()
                          ) -> tuple[bytes, Optional[int]]:
  """(body, JSON length) of the response `infer_response` describes: the outputs in
  `binary_outputs` leave their bytes after the JSON, in output order, and the JSON
  length is the `Inference-Header-Content-Length` to send; with none, (JSON, None)."""
  obj, blobs = _response_parts(model_name=model_name, version=version, req_id=req_id,
                               logits=logits, parameters=parameters,
                               binary_outputs=binary_outputs)
  head = dumps(obj)
  if not blobs:
    return head, None
  return b"".join([head, *blobs]), len(head)
