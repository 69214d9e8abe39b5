"""KServe v2 request parsing and responses (coltrain.serve.protocol)."""

import json

import numpy as np
import pytest

from coltrain.serve.protocol import (ProtocolError, encode_infer_response, header_length,
                                     infer_response, parse_infer_request)

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


# -- binary tensor data (the protocol's binary extension) ---------------------------------
def binary_body(x, datatype="UINT8", size=None, **top):
  blob = x.astype(x.dtype.newbyteorder("<")).tobytes()
  t = {"name": "images", "shape": list(x.shape), "datatype": datatype,
       "parameters": {"binary_data_size": len(blob) if size is None else size}}
  head = json.dumps({"inputs": [t], **top}).encode()
  return head + blob, len(head)


@pytest.mark.parametrize("datatype,dtype", [("UINT8", np.uint8), ("FP32", np.float32),
                                            ("FP64", np.float64), ("INT32", np.int32)])
def test_binary_input_equals_the_same_json_request(datatype, dtype):
  x = np.random.default_rng(1).integers(0, 256, (2, 28, 28, 1)).astype(dtype)
  raw, n = binary_body(x, datatype, id="b")
  r = parse_infer_request(raw, image_shape=SHAPE, max_images=8, json_length=n)
  same = parse(json.dumps({"id": "b", "inputs": [{
      "name": "images", "shape": [2, 28, 28, 1], "datatype": datatype,
      "data": x.ravel().tolist()}]}).encode())
  assert r.id == "b" and r.images.dtype == np.float32
  np.testing.assert_array_equal(r.images, same.images)
  assert r.images[1, 27, 27, 0] == x[1, 27, 27, 0]


def test_bad_binary_requests_get_precise_errors():
  x = np.zeros((1, 28, 28, 1), np.uint8)
  raw, n = binary_body(x)

  def err(raw, n):
    with pytest.raises(ProtocolError) as e:
      parse_infer_request(raw, image_shape=SHAPE, max_images=8, json_length=n)
    return str(e.value)

  assert "needs binary data" in str(pytest.raises(ProtocolError, parse, raw[:n]).value)
  assert "body has only" in err(raw, len(raw) + 1)
  assert "holds 783 bytes" in err(raw[:-1], n)
  assert "must be 784" in err(*binary_body(x, size=700))
  assert "must be 3136" in err(*binary_body(x.astype(np.float32), "FP32", size=784))
  assert "not valid JSON" in err(raw, n - 1)
  nan = np.full((1, 28, 28, 1), np.nan, np.float32)
  assert "non-finite" in err(*binary_body(nan, "FP32"))
  both = json.loads(raw[:n])
  both["inputs"][0]["data"] = [0] * 784
  head = json.dumps(both).encode()
  assert "both 'data' and" in err(head + raw[n:], len(head))
  with pytest.raises(ProtocolError, match="non-negative integer"):
    header_length("12a")
  assert header_length(" 42 ") == 42 and header_length(None) is None


def test_binary_outputs_are_asked_for_and_encoded_after_the_json():
  x = np.zeros((1, 28, 28, 1), np.uint8)
  assert parse(body()).binary_outputs == frozenset()
  ask = parse(body(parameters={"binary_data_output": True}))
  assert ask.binary_outputs == {"logits", "label"}
  one = parse(body(outputs=[{"name": "logits", "parameters": {"binary_data": True}},
                            {"name": "label"}]))
  assert one.binary_outputs == {"logits"}
  for bad, needle in (([{"name": "probs"}], "must be one of"),
                      ([{"name": "label", "parameters": {"binary_data": 1}}],
                       "must be true or false"), ({"name": "x"}, "must be a list")):
    with pytest.raises(ProtocolError, match=needle):
      parse(body(outputs=bad))
  logits = np.array([[0.5, -2.0, 3.25], [1.0, 0.0, 0.0]], np.float32)
  r = dict(model_name="m", version=7, req_id=None, logits=logits, parameters={},
           binary_outputs=one.binary_outputs)
  raw, n = encode_infer_response(**r)
  assert json.loads(raw[:n]) == json.loads(json.dumps(infer_response(**r)))
  head = json.loads(raw[:n])
  out = {o["name"]: o for o in head["outputs"]}
  assert "data" not in out["logits"] and out["logits"]["parameters"] == {
      "binary_data_size": 24}
  assert out["label"]["data"] == [2, 0]
  np.testing.assert_array_equal(np.frombuffer(raw[n:], "<f4").reshape(2, 3), logits)
  raw, n = encode_infer_response(model_name="m", version=7, req_id=None, logits=logits,
                                 parameters={}, binary_outputs=frozenset({"logits", "label"}))
  assert len(raw) - n == 24 + 16
  np.testing.assert_array_equal(np.frombuffer(raw[n + 24:], "<i8"), [2, 0])
  plain, none = encode_infer_response(model_name="m", version=7, req_id=None,
                                      logits=logits, parameters={})
  assert none is None and json.loads(plain)["outputs"][1]["data"] == [2, 0]
