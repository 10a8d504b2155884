"""Explicit transposes of linear layers: ``<fn(x), y> == <x, adjoint(y)>`` exactly (float64),
and the spectral solver gives the same norm with and without them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz.autolip import AutoLip
from tf_lipschitz.graph import build_graph
from tf_lipschitz.operators import LinearOperator, compose
from tf_lipschitz.power import SpectralSolver, jtj_product
from tf_lipschitz.rules import get_rule
from tf_lipschitz.rules.base import NodeContext

L = keras.layers

# (layer factory, input shape without batch): every padding, odd and even kernels, dilation.
STRIDE1 = {
    "conv2d_same_k3": (lambda: L.Conv2D(4, 3, padding="same"), (7, 6, 3)),
    "conv2d_same_k2": (lambda: L.Conv2D(4, 2, padding="same"), (7, 6, 3)),
    "conv2d_same_k4_dil2": (lambda: L.Conv2D(3, (4, 3), padding="same", dilation_rate=2),
                            (9, 8, 2)),
    "conv2d_valid_k3": (lambda: L.Conv2D(4, 3, padding="valid"), (7, 6, 3)),
    "conv2d_valid_k2_dil3": (lambda: L.Conv2D(2, 2, padding="valid", dilation_rate=3),
                             (8, 9, 2)),
    "conv1d_causal_k3_dil2": (lambda: L.Conv1D(3, 3, padding="causal", dilation_rate=2),
                              (11, 2)),
    "conv1d_same_k4": (lambda: L.Conv1D(3, 4, padding="same"), (10, 2)),
    "conv3d_same_k3": (lambda: L.Conv3D(2, 3, padding="same"), (4, 5, 3, 2)),
    "conv3d_valid_k2": (lambda: L.Conv3D(2, 2, padding="valid"), (4, 5, 3, 2)),
    "depthwise2d_same_k3": (lambda: L.DepthwiseConv2D(3, padding="same"), (6, 7, 3)),
    "depthwise2d_valid_k2_dil2": (lambda: L.DepthwiseConv2D(2, padding="valid",
                                                            dilation_rate=2), (6, 7, 3)),
    "depthwise1d_same_k4": (lambda: L.DepthwiseConv1D(4, padding="same"), (9, 2)),
    # the kernel (3·3·16·16) dwarfs the input: its flip is prepared once per solve, not per
    # product, so such layers use their adjoint too
    "conv2d_kernel_dwarfs_input": (lambda: L.Conv2D(16, 3, padding="same"), (2, 2, 16)),
}

NO_ADJOINT = {
    "conv2d_stride2": (lambda: L.Conv2D(3, 3, strides=2, padding="same"), (7, 7, 2)),
    "conv2d_groups2": (lambda: L.Conv2D(4, 3, padding="same", groups=2), (6, 6, 4)),
    "depthwise_multiplier2": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2,
                                                        padding="same"), (6, 6, 2)),
}


def _bound(layer, shape):
    layer.build((None, *shape))
    out_shape = tuple(layer.compute_output_shape((1, *shape))[1:])
    ctx = NodeContext(input_shapes=(shape,), output_shapes=(out_shape,), dependent=(True,),
                      constants=(None,), dtype="float32", name=layer.name)
    return get_rule(layer)(layer, ctx), out_shape


@pytest.mark.parametrize("name", sorted(STRIDE1))
def test_conv_adjoint_is_the_transpose(name):
    factory, shape = STRIDE1[name]
    keras.utils.set_random_seed(0)
    bound, out_shape = _bound(factory(), shape)
    assert bound.adjoint is not None
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((2, *shape)))
    y = tf.constant(rng.standard_normal((2, *out_shape)))
    fx, aty = bound.fn(x), bound.adjoint(y)
    assert tuple(aty.shape) == (2, *shape)
    lhs = float(tf.reduce_sum(fx * y))
    rhs = float(tf.reduce_sum(x * aty))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)
    # ... and equal to the autodiff backward pass
    _, tape = jtj_product(bound.fn, x)
    _, explicit = jtj_product(bound.fn, x, bound.adjoint)
    np.testing.assert_allclose(explicit.numpy(), tape.numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(NO_ADJOINT))
def test_no_adjoint_where_the_transpose_is_not_a_plain_convolution(name):
    factory, shape = NO_ADJOINT[name]
    bound, _ = _bound(factory(), shape)
    assert bound.adjoint is None


def test_per_channel_layers_are_self_adjoint_and_compose():
    keras.utils.set_random_seed(0)
    shape = (5, 5, 3)
    conv = L.Conv2D(3, 3, padding="same")
    bn = L.BatchNormalization()
    resc = L.Rescaling(scale=[0.5, -2.0, 3.0])
    bounds = []
    for layer in (conv, bn, resc):
        b, _ = _bound(layer, shape)
        bounds.append(b)
    bn.moving_variance.assign(np.array([0.3, 2.0, 0.7], "float32"))
    bn.gamma.assign(np.array([1.5, -0.4, 0.9], "float32"))
    op = compose([LinearOperator(b.fn, shape, adjoint=b.adjoint) for b in bounds])
    assert op.adjoint is not None
    rng = np.random.default_rng(2)
    x = tf.constant(rng.standard_normal((1, *shape)))
    y = tf.constant(rng.standard_normal((1, *shape)))
    assert float(tf.reduce_sum(op.fn(x) * y)) == pytest.approx(
        float(tf.reduce_sum(x * op.adjoint(y))), rel=1e-10)
    # one member without an adjoint: the composition falls back to autodiff
    other = compose([LinearOperator(bounds[0].fn, shape, adjoint=bounds[0].adjoint),
                     LinearOperator(lambda v: 2.0 * v, shape)])
    assert other.adjoint is None


def test_solver_norm_is_the_same_with_the_explicit_adjoint():
    keras.utils.set_random_seed(3)
    shape = (12, 12, 4)
    bound, _ = _bound(L.Conv2D(5, 3, padding="same"), shape)
    dense = LinearOperator(bound.fn, shape, dtype="float64").to_dense().astype(np.float64)
    exact = np.linalg.norm(dense, 2)
    with_adj = LinearOperator(bound.fn, shape, adjoint=bound.adjoint)
    without = LinearOperator(bound.fn, shape)
    for op in (with_adj, without):
        res = SpectralSolver([op]).run(tol=1e-7, init=None)[0]
        assert res.converged
        assert res.sigma == pytest.approx(exact, rel=1e-5)


def test_autolip_uses_adjoints_for_stride1_chains():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((10, 10, 2)),
        L.Conv2D(4, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
        L.Conv2D(4, 3, strides=2, padding="same"), L.ReLU(),
        L.Flatten(), L.Dense(3),
    ])
    engine = AutoLip(build_graph(model))
    adj = {op.name: op.adjoint is not None for op in engine.operators}
    names = sorted(adj)
    assert any("batch_normalization" in n and adj[n] for n in names)  # conv + BN fused
    assert not any("flatten" in n and adj[n] for n in names)
    report = tfl.LipschitzEstimator(model, verbose=0, tol=1e-7).autolip(certified=True)
    assert report.certified


def test_adjoint_is_prepared_once_per_solve(monkeypatch):
    """The flipped kernel is computed when the solver binds the adjoint, outside its loop: the
    traced solver calls ``prepare`` once per operator, however many products it runs."""
    from tf_lipschitz.operators import Adjoint

    keras.utils.set_random_seed(0)
    bound, _ = _bound(L.Conv2D(8, 3, padding="same", use_bias=False), (9, 9, 8))
    assert isinstance(bound.adjoint, Adjoint)
    calls = []
    prepare = bound.adjoint.prepare
    monkeypatch.setattr(bound.adjoint, "prepare", lambda dtype: calls.append(dtype) or prepare(dtype))
    op = compose([LinearOperator(bound.fn, (9, 9, 8), adjoint=bound.adjoint)] * 2)
    res = SpectralSolver([op]).run(tol=1e-8, init=None)[0]
    assert res.products > 10 and len(calls) == 2  # one trace, two members of the chain
    exact = np.linalg.svd(op.to_dense(), compute_uv=False)[0]
    assert res.sigma == pytest.approx(exact, rel=1e-5)
