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


class ProtocolError(ValueError):
  """A malformed request (HTTP 400); the message is sent to the client."""


@dataclasses.dataclass(frozen=True)
class InferRequest:
  """A validated inference request: `images` float32 (n, H, W, C)."""
  images: np.ndarray
  id: Optional[str] = None
  deadline_ms: Optional[float] = None


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_infer_request(body: bytes, *, image_shape: tuple[int, ...],
                        max_images: int) -> InferRequest:
  """Parses and validates a KServe v2 JSON inference request (see module docstring)."""
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
  outputs = obj.get("outputs")
  if outputs is not None and not isinstance(outputs, list):
    raise ProtocolError("'outputs' must be a list")
  inputs = obj.get("inputs")
  if not isinstance(inputs, list) or len(inputs) != 1:
    raise ProtocolError("'inputs' must be a list holding exactly one tensor (the images)")
  images = _parse_tensor(inputs[0], image_shape, max_images)
  return InferRequest(images=images, id=req_id, deadline_ms=deadline)


def _parse_tensor(t: Any, image_shape: tuple[int, ...], max_images: int) -> np.ndarray:
  if not isinstance(t, dict):
    raise ProtocolError("'inputs[0]' must be a JSON object with name, shape, datatype, data")
  for key in ("name", "shape", "datatype", "data"):
    if key not in t:
      raise ProtocolError(f"'inputs[0]' is missing '{key}'")
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


def dumps(obj: Any) -> bytes:
  """JSON bytes of a response object (orjson: numpy scalars and arrays allowed)."""
  return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def infer_response(*, model_name: str, version: int, req_id: Optional[str],
                   logits: np.ndarray, parameters: dict[str, Any]) -> dict[str, Any]:
  """The KServe v2 response for one request's `logits` (n, K)."""
  out = {"model_name": model_name, "model_version": str(version),
         "outputs": [
             {"name": "logits", "datatype": "FP32", "shape": list(logits.shape),
              "data": logits.astype(np.float32).ravel().tolist()},
             {"name": "label", "datatype": "INT64", "shape": [int(logits.shape[0])],
              "data": np.argmax(logits, axis=-1).tolist()}],
         "parameters": parameters}
  if req_id is not None:
    out["id"] = req_id
  return out
