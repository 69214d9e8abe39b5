"""KServe v2 request parsing and responses (coltrain.serve.protocol)."""

import json

import numpy as np
import pytest

from coltrain.serve.protocol import ProtocolError, infer_response, parse_infer_request

SHAPE = (28, 28, 1)


def body(**kw):
  t = {"name": "images", "shape": [2, 28, 28, 1], "datatype": "FP32",
       "data": list(range(2 * 784))}
  top = {k: kw.pop(k) for k in ("id", "parameters", "outputs") if k in kw}
  t.update(kw)
  return json.dumps({"inputs": [t], **top}).encode()


def parse(b, max_images=8):
  return parse_infer_request(b, image_shape=SHAPE, max_images=max_images)


def test_valid_flat_request_is_reshaped_row_major():
  r = parse(body(id="r1", parameters={"deadline_ms": 25}))
  assert r.images.shape == (2, 28, 28, 1) and r.images.dtype == np.float32
  assert r.images[1, 0, 0, 0] == 784 and r.images[0, 0, 1, 0] == 1
  assert r.id == "r1" and r.deadline_ms == 25.0


def test_nested_data_matching_shape_and_integer_datatypes_are_accepted():
  data = np.arange(784).reshape(1, 28, 28, 1) % 256
  r = parse(body(shape=[1, 28, 28, 1], datatype="UINT8", data=data.tolist()))
  np.testing.assert_array_equal(r.images, data.astype(np.float32))
  assert r.deadline_ms is None and r.id is None


@pytest.mark.parametrize("raw,needle", [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[" * 50000, "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"inputs": 3}', "exactly one tensor"),
    (b'{"inputs": []}', "exactly one tensor"),
    (b'{"inputs": [7]}', "JSON object with name"),
    (b'{"inputs": [{"name": "x"}]}', "missing 'shape'"),
])
def test_malformed_framing_is_a_clear_protocol_error(raw, needle):
  with pytest.raises(ProtocolError, match=needle):
    parse(raw)


@pytest.mark.parametrize("kw,needle", [
    (dict(datatype="BYTES"), "datatype' must be one of"),
    (dict(name=3), "name' must be a string"),
    (dict(shape="2,28,28,1"), "list of integers"),
    (dict(shape=[2, 28, 28]), r"must be \[n, 28, 28, 1\]"),
    (dict(shape=[2, 28, 28, True]), "list of integers"),
    (dict(shape=[0, 28, 28, 1], data=[]), "1..8 images"),
    (dict(shape=[9, 28, 28, 1], data=[0] * 9 * 784), "1..8 images"),
    (dict(data="abc"), "must be a list"),
    (dict(data=["a"] * 1568), "only numbers"),
    (dict(data=[0.0] * 1567), "has 1567 values"),
    (dict(data=[[0.0]] * 1568), "nested as"),
    (dict(data=[[1, 2], [3]]), "only numbers"),
    (dict(datatype="UINT8", data=[300] * 1568), "integers in"),
    (dict(datatype="INT32", data=[0.5] * 1568), "integers in"),
    (dict(id=5), "'id' must be a string"),
    (dict(parameters=[1]), "'parameters' must be a JSON object"),
    (dict(parameters={"deadline_ms": -1}), "deadline_ms"),
    (dict(parameters={"deadline_ms": "soon"}), "deadline_ms"),
    (dict(outputs="logits"), "'outputs' must be a list"),
])
def test_invalid_tensor_fields_are_rejected_with_the_field_named(kw, needle):
  with pytest.raises(ProtocolError, match=needle):
    parse(body(**kw))


def test_non_finite_values_are_rejected():
  raw = body().replace(b"[0, 1,", b"[NaN, 1,", 1)
  with pytest.raises(ProtocolError, match="non-finite"):
    parse(raw)
  raw = body().replace(b"[0, 1,", b"[1e999, 1,", 1)
  with pytest.raises(ProtocolError, match="non-finite"):
    parse(raw)


def test_random_bytes_never_raise_anything_but_protocol_error():
  rng = np.random.default_rng(0)
  for _ in range(300):
    raw = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
    with pytest.raises(ProtocolError):
      parse(raw)


def test_response_has_logits_labels_and_version():
  logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]], np.float32)
  r = infer_response(model_name="m", version=40, req_id="x", logits=logits,
                     parameters={"replica": 0})
  assert r["model_name"] == "m" and r["model_version"] == "40" and r["id"] == "x"
  out = {o["name"]: o for o in r["outputs"]}
  assert out["logits"]["shape"] == [2, 3] and out["logits"]["datatype"] == "FP32"
  np.testing.assert_allclose(out["logits"]["data"], logits.ravel(), rtol=1e-6)
  assert out["label"]["data"] == [1, 0] and out["label"]["shape"] == [2]
  assert "id" not in infer_response(model_name="m", version=0, req_id=None, logits=logits,
                                    parameters={})
