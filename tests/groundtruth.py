"""Ground truth shared by the tests: dense matrices of layers' linear parts.

Importable from any test module (``from groundtruth import affine_map``): pytest puts the
``tests`` directory on ``sys.path``.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf


def affine_map(layers: keras.layers.Layer | Sequence[keras.layers.Layer],
               in_shape: Sequence[int], dtype: str = "float32") -> np.ndarray:
    """Dense ``(out, in)`` float64 matrix of a layer (or chain of layers), bias removed.

    The chain is evaluated (inference mode, inputs of ``dtype``) on the zero input and the ``n`` unit inputs; the matrix
    is the difference. An activation inside a layer (``Dense(activation="relu")``) is switched
    off while it runs: the result is the linear part that AutoLip and SeqLip measure, the
    activation counting apart (after the group, for a scaling commuted through it).

    Args:
        layers: A built layer or a sequence of layers applied in order.
        in_shape: Per-example input shape.
        dtype: Dtype of the inputs fed to the chain.

    Returns:
        The matrix ``M`` with ``layer(x) - layer(0) = M @ x.ravel()``.
    """
    if isinstance(layers, keras.layers.Layer):
        layers = [layers]
    n = int(np.prod(in_shape))
    basis = np.concatenate([np.zeros((1, n)), np.eye(n)]).reshape((n + 1, *in_shape))
    y = tf.constant(basis.astype(dtype))
    for layer in layers:
        act = getattr(layer, "activation", None)
        if act is not None:
            layer.activation = keras.activations.linear
        try:
            y = layer(y, training=False)
        finally:
            if act is not None:
                layer.activation = act
    y = np.asarray(y).reshape(n + 1, -1).astype(np.float64)
    return (y[1:] - y[:1]).T


def top_singular_value(matrix: np.ndarray) -> float:
    """Largest singular value of a dense matrix, from a float64 SVD."""
    return float(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0])


def exact_norm(layers: keras.layers.Layer | Sequence[keras.layers.Layer],
               in_shape: Sequence[int], dtype: str = "float32") -> float:
    """Operator norm of the linear part of a layer or chain: :func:`affine_map`'s top singular
    value (the ground truth that bounds and certificates are checked against)."""
    return top_singular_value(affine_map(layers, in_shape, dtype))
