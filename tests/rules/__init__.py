"""Tests of the layer rules; shared ground-truth helpers."""

import numpy as np
import tensorflow as tf


def jacobian_norm(model, x) -> float:
    """Spectral norm of the dense Jacobian of ``model`` at one example ``x`` (float64 SVD)."""
    x = tf.constant(x[None], tf.float64 if model.dtype == "float64" else tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x)
    jac = tape.jacobian(y, x).numpy().reshape(int(np.prod(y.shape)), -1).astype(np.float64)
    return float(np.linalg.svd(jac, compute_uv=False)[0])
