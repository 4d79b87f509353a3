"""A TF Serving REST predict emulator, so tests check that exported SavedModels answer like TF Serving.

`rest_predict(loaded, body)` takes the JSON body of POST /v1/models/<name>:predict and
returns TF Serving's answer, or raises RestError where TF Serving answers HTTP 400.
"""
from __future__ import annotations

import base64
import binascii
import json

import numpy as np
import tensorflow as tf

from tbhvae.checks import tf_message_lines


class RestError(ValueError):
    """A REST request TF Serving would reject (HTTP 400); the message names the problem."""


def _decode_b64(name: str, value):
    """{"b64": "..."} objects (TF Serving's binary encoding) -> bytes, recursively; plain strings stay."""
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise RestError(f"a JSON object in a tensor value must be {{\"b64\": ...}}, got keys {sorted(value)}")
        try:
            if not isinstance(value["b64"], str):
                raise TypeError(f"a {type(value['b64']).__name__}, not a string")
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, TypeError) as err:
            raise RestError(f"input '{name}': a \"b64\" value is not valid base64 ({err})") from None
    if isinstance(value, list):
        return [_decode_b64(name, v) for v in value]
    if not isinstance(value, str):
        raise RestError(f"input '{name}': each value must be a string or {{\"b64\": ...}}, got "
                        f"{type(value).__name__} {value!r}")
    return value


def _checked_numbers(name: str, array: np.ndarray, dtype: tf.DType) -> np.ndarray:
    """float64 values -> `dtype`, refusing non-finite values and what the dtype cannot hold exactly."""
    if not np.all(np.isfinite(array)):
        raise RestError(f"input '{name}': values must be finite numbers (got null, NaN or Infinity, "
                        f"or a number beyond float64)")
    if dtype.is_integer:
        if np.any(array != np.round(array)) or np.any(array < dtype.min) or np.any(array > dtype.max):
            raise RestError(f"input '{name}': values must be integers in [{dtype.min}, {dtype.max}] "
                            f"({dtype.name})")
    elif np.any(np.abs(array) > np.finfo(dtype.as_numpy_dtype).max):
        raise RestError(f"input '{name}': values beyond the {dtype.name} range")
    return array.astype(dtype.as_numpy_dtype)


def _to_tensor(name: str, value, spec: tf.TensorSpec) -> tf.Tensor:
    """One input's JSON value -> a tensor of `spec`'s dtype and shape; RestError naming the input otherwise."""
    if spec.dtype == tf.string:
        value = _decode_b64(name, value)
    try:
        # read as float64 first, so that nulls, NaN, Infinity, overflow and fractional
        # pixels are seen before the cast to the signature's dtype could hide them
        array = np.asarray(value, dtype=object if spec.dtype == tf.string else None)
        if spec.dtype != tf.string:
            if array.dtype.kind in "USO" and any(isinstance(v, str) for v in array.ravel()):
                raise ValueError("strings where numbers belong")
            array = array.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise RestError(f"input '{name}': cannot be read as {spec.dtype.name} ({err}); every instance "
                        f"needs the same shape {spec.shape[1:].as_list()}") from None
    if spec.dtype != tf.string:
        array = _checked_numbers(name, array, spec.dtype)
    if not spec.shape.is_compatible_with(array.shape):
        raise RestError(f"input '{name}': expected shape {spec.shape.as_list()} (None = any), got "
                        f"{list(array.shape)}")
    return tf.constant(array, dtype=spec.dtype)


def _problem_line(message: str) -> str:
    """The line of a TF error that says what is wrong: a shape mismatch, else the op's own message.

    Graph execution errors start with "Graph execution error:" and the Python trace of the
    failing node; the op's message (e.g. "Unknown image file format ...") comes last, after
    {{function_node ...}} tags and before the [[node ...]] line.
    """
    lines = [line for line in tf_message_lines(message)
             if not line.startswith(("Graph execution error", "Detected at node", "File ", "[["))]
    return next((line for line in lines if "compatible" in line or "expected" in line),
                lines[-1] if lines else "the signature rejected the input")


def rest_predict(loaded, body: dict | str) -> dict:
    """TF Serving's REST predict on a loaded SavedModel (`_predict`); a body nested too deeply is a RestError."""
    try:
        return _predict(loaded, body)
    except RecursionError:
        raise RestError("request body is nested too deeply") from None


def _predict(loaded, body: dict | str) -> dict:
    """Runs a TF Serving REST predict request body through a loaded SavedModel.

    body: {"instances": [...]} (row format: each instance is the value of the only
    input or a dict of named inputs) or {"inputs": value or {name: value}}
    (columnar); optional "signature_name" (default serving_default). Binary
    strings are {"b64": "..."}. Returns what TF Serving answers:
    {"predictions": [{output: value, ...} per instance]} for the row format,
    {"outputs": {output: value}} for the columnar one (bare values when the
    signature has a single output). Raises RestError where TF Serving answers
    HTTP 400.
    """
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as err:
            raise RestError(f"request body is not valid JSON ({err})") from None
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise RestError("request body must be a JSON object with exactly one of 'instances' (row format) "
                        "or 'inputs' (columnar format)")
    extra = sorted(set(body) - {"instances", "inputs", "signature_name"})
    if extra:
        raise RestError(f"unknown request key(s) {', '.join(extra)}; a predict request has 'instances' or "
                        f"'inputs' and optionally 'signature_name'")
    name = body.get("signature_name", "serving_default")
    if name not in loaded.signatures:
        raise RestError(f"signature_name '{name}' not found; the model has {', '.join(loaded.signatures)}")
    signature = loaded.signatures[name]
    specs = signature.structured_input_signature[1]
    row_format = "instances" in body
    if row_format:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise RestError("'instances' must be a non-empty list")
        named = all(isinstance(i, dict) and "b64" not in i for i in instances)
        if named:
            columns = {key: [i.get(key) for i in instances] for key in specs}
            missing = sorted(key for key in specs if any(i.get(key) is None for i in instances))
            if missing:
                raise RestError(f"every instance needs the input(s) {', '.join(missing)}")
            unknown = sorted({key for i in instances for key in i} - set(specs))
            if unknown:  # TF Serving: 400 "does not have named input"
                raise RestError(f"the signature does not have named input(s) {', '.join(unknown)}; it takes "
                                f"{', '.join(specs)}")
        elif len(specs) == 1:
            columns = {next(iter(specs)): instances}
        else:
            raise RestError(f"the signature has several inputs ({', '.join(specs)}); give each instance "
                            f"as an object of named inputs")
    else:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and "b64" not in inputs:
            columns = inputs
        elif len(specs) == 1:
            columns = {next(iter(specs)): inputs}
        else:
            raise RestError(f"the signature has several inputs ({', '.join(specs)}); give 'inputs' as an "
                            f"object of named inputs")
    unknown = sorted(set(columns) - set(specs))
    if unknown:
        raise RestError(f"unknown input(s) {', '.join(unknown)}; the signature takes {', '.join(specs)}")
    tensors = {key: _to_tensor(key, columns[key], spec) for key, spec in specs.items()}
    try:
        outputs = {key: value.numpy() for key, value in signature(**tensors).items()}
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as err:
        raise RestError(_problem_line(getattr(err, "message", str(err)))) from None
    names = sorted(outputs)
    if row_format:
        count = len(instances)
        if len(names) == 1:
            return {"predictions": [outputs[names[0]][i].tolist() for i in range(count)]}
        return {"predictions": [{key: outputs[key][i].tolist() for key in names} for i in range(count)]}
    if len(names) == 1:
        return {"outputs": outputs[names[0]].tolist()}
    return {"outputs": {key: outputs[key].tolist() for key in names}}
