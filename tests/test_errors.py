"""Bad arguments raise InvalidArgumentError (a LipschitzError and a ValueError) naming them.

One row per public entry point and argument: the call, the argument's name and the text of the
value received, both expected in the message. ``except tfl.LipschitzError`` catches every one
of them, and so does ``except ValueError`` (what Keras raises for bad arguments).
"""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz import certify, tfgraph
from tf_lipschitz.autolip import AutoLip
from tf_lipschitz.graph import build_graph
from tf_lipschitz.operators import LinearOperator, compose
from tf_lipschitz.power import SpectralSolver, spectral_norm, top_singular_triplets
from tf_lipschitz.seqlip import SeqLip, operator_spectrum, pattern_max


def _mlp(widths, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((widths[0],))]
    layers += [keras.layers.Dense(w, activation="relu") for w in widths[1:-1]]
    layers.append(keras.layers.Dense(widths[-1]))
    return keras.Sequential(layers)


def _halve(x):
    return 0.5 * x


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    model = _mlp((6, 8, 2))
    est = tfl.LipschitzEstimator(model, verbose=0)
    module = tf.Module()
    module.w = tf.Variable(np.eye(3, dtype=np.float32))
    module.f = tf.function(lambda x: tf.matmul(x, module.w),
                           input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    saved = str(tmp_path_factory.mktemp("errors") / "sm")
    tf.saved_model.save(module, saved, signatures={"score": module.f})
    spec = tf.TensorSpec([None, 3], tf.float32)
    return types.SimpleNamespace(
        model=model, est=est, wide=tfl.LipschitzEstimator(_mlp((5, 24, 2), seed=8), verbose=0),
        op=LinearOperator(_halve, (3,)), fn=tf.function(lambda x: 2.0 * x), spec=spec,
        graph_est=tfl.GraphEstimator(tf.function(lambda x: 2.0 * x), spec), saved=saved)


CASES = [
    # LipschitzEstimator: construction
    ("estimator-solver", lambda c: tfl.LipschitzEstimator(c.model, solver="svd"),
     "solver", "'svd'"),
    ("estimator-tol-negative", lambda c: tfl.LipschitzEstimator(c.model, tol=-1), "tol", "-1"),
    ("estimator-tol-large", lambda c: tfl.LipschitzEstimator(c.model, tol=0.9), "tol", "0.9"),
    ("estimator-tol-type", lambda c: tfl.LipschitzEstimator(c.model, tol="small"),
     "tol", "'small'"),
    ("estimator-max-products", lambda c: tfl.LipschitzEstimator(c.model, max_products=0),
     "max_products", "0"),
    ("estimator-max-products-type",
     lambda c: tfl.LipschitzEstimator(c.model, max_products="many"), "max_products", "'many'"),
    ("estimator-input-shape", lambda c: tfl.LipschitzEstimator(c.model, input_shape=(5,)),
     "input_shape", "(5,)"),
    ("estimator-input-shape-type", lambda c: tfl.LipschitzEstimator(c.model, input_shape="6"),
     "input_shape", "'6'"),
    ("estimator-model", lambda c: tfl.LipschitzEstimator("model.keras"), "model",
     "'model.keras'"),
    # LipschitzEstimator: methods
    ("autolip-init", lambda c: c.est.autolip(init="hot"), "init", "'hot'"),
    ("autolip-init-count", lambda c: c.est.autolip(init=[np.ones(6)]), "init", "received 1 array."),
    ("autolip-init-shape", lambda c: c.est.autolip(init=[np.ones(5), np.ones(8)]),
     "init[0]", "(5,)"),
    ("seqlip-mode", lambda c: c.est.seqlip(mode="bogus"), "mode", "'bogus'"),
    ("seqlip-unknown-option", lambda c: c.est.seqlip(topk=3), "topk", "top_k"),
    ("seqlip-top-k", lambda c: c.est.seqlip(top_k=0), "top_k", "0"),
    ("seqlip-max-exact-width", lambda c: c.est.seqlip(max_exact_width=40),
     "max_exact_width", "40"),
    ("seqlip-split", lambda c: c.est.seqlip(split="cube"), "split", "'cube'"),
    ("seqlip-remainder", lambda c: c.est.seqlip(remainder="no"), "remainder", "'no'"),
    ("seqlip-subspace-tol", lambda c: c.est.seqlip(subspace_tol=1.0), "subspace_tol", "1.0"),
    ("seqlip-subspace-max-iter", lambda c: c.est.seqlip(subspace_max_iter=0),
     "subspace_max_iter", "0"),
    ("seqlip-max-sweeps", lambda c: c.est.seqlip(max_sweeps=0), "max_sweeps", "0"),
    ("seqlip-dense-limit", lambda c: c.est.seqlip(dense_limit=-1), "dense_limit", "-1"),
    ("seqlip-exact-too-wide", lambda c: c.wide.seqlip(mode="exact", max_exact_width=4),
     "max_exact_width", "24 activations"),
    ("estimate-unknown-option", lambda c: c.est.estimate(topk=3), "topk", "top_k"),
    ("estimate-mode", lambda c: c.est.estimate(mode="fastest"), "mode", "'fastest'"),
    ("estimate-lower-options", lambda c: c.est.estimate(lower_bound_options={"nrandom": 4}),
     "lower_bound_options", "nrandom"),
    ("lower-bound-unknown", lambda c: c.est.lower_bound(nrandom=4), "nrandom", "n_random"),
    ("extreme-value-unknown", lambda c: c.est.extreme_value_estimate(batchs=4), "batchs",
     "batches"),
    # AutoLip and SeqLip engines
    ("autolip-method", lambda c: AutoLip(c.est.graph, method="svd"), "method", "'svd'"),
    ("autolip-tol", lambda c: AutoLip(c.est.graph, tol=0.0), "tol", "0.0"),
    ("autolip-krylov-dim", lambda c: AutoLip(c.est.graph, krylov_dim=1), "krylov_dim", "1"),
    ("seqlip-run-top-k", lambda c: SeqLip(c.est.engine).run(top_k=-2), "top_k", "-2"),
    ("operator-spectrum-tol", lambda c: operator_spectrum(c.op, 3, tol=0.0), "tol", "0.0"),
    ("pattern-max-shapes", lambda c: pattern_max(np.ones((3, 4)), np.ones((3, 4))), "left",
     "(3, 4)"),
    ("pattern-max-slopes", lambda c: pattern_max(np.ones((1, 2)), np.ones((2, 1)), (1.0, 0.0)),
     "slopes", "(1.0, 0.0)"),
    ("pattern-max-mode", lambda c: pattern_max(np.ones((1, 2)), np.ones((2, 1)), mode="fast"),
     "mode", "'fast'"),
    ("pattern-max-exact-width", lambda c: pattern_max(np.ones((1, 40)), np.ones((40, 1))),
     "mode", "2^40"),
    # Spectral solvers
    ("solver-method", lambda c: SpectralSolver([c.op], method="svd"), "method", "'svd'"),
    ("solver-krylov-dim", lambda c: SpectralSolver([c.op], krylov_dim=1), "krylov_dim", "1"),
    ("solver-tol", lambda c: SpectralSolver([c.op]).run(tol=0), "tol", "0"),
    ("solver-max-products", lambda c: SpectralSolver([c.op]).run(max_products=0),
     "max_products", "0"),
    ("solver-init", lambda c: SpectralSolver([c.op]).run(init="cold"), "init", "'cold'"),
    ("solver-init-count", lambda c: SpectralSolver([c.op]).run(init=[np.ones(3)] * 2),
     "init", "received 2 arrays"),
    ("spectral-norm-tol", lambda c: spectral_norm(_halve, (3,), tol=2.0), "tol", "2.0"),
    ("spectral-norm-method", lambda c: spectral_norm(_halve, (3,), method="svd"), "method",
     "'svd'"),
    ("triplets-k", lambda c: top_singular_triplets(c.op, 0), "k", "0"),
    ("triplets-tol", lambda c: top_singular_triplets(c.op, 1, tol=0.5), "tol", "0.5"),
    ("triplets-max-iter", lambda c: top_singular_triplets(c.op, 1, max_iter=0), "max_iter", "0"),
    ("compose-empty", lambda c: compose([]), "operators", "empty"),
    # Certificates
    ("max-singular-value-shape", lambda c: certify.max_singular_value(np.ones(3)), "matrices",
     "(3,)"),
    ("max-singular-value-method", lambda c: certify.max_singular_value(np.eye(2), method="svd"),
     "method", "'svd'"),
    ("max-singular-value-rtol", lambda c: certify.max_singular_value(np.eye(2), rtol=-0.5),
     "rtol", "-0.5"),
    ("gram-iteration-shape", lambda c: certify.gram_iteration(np.eye(2)), "matrices", "(2, 2)"),
    ("gram-iteration-iterations", lambda c: certify.gram_iteration(np.ones((1, 2, 2)), -1),
     "iterations", "-1"),
    # Graph walk and rules
    ("build-graph-model", lambda c: build_graph(object()), "model", "object"),
    ("build-graph-input-shape", lambda c: build_graph(c.model, input_shape=(2, 3)),
     "input_shape", "(2, 3)"),
    ("register-rule-instance",
     lambda c: tfl.register_rule(keras.layers.Dense(2), tfl.rules.constant(1.0)),
     "layer_class", "Dense"),
    ("register-rule-callable", lambda c: tfl.register_rule(keras.layers.Dense, "affine"),
     "rule", "'affine'"),
    ("rules-constant", lambda c: tfl.rules.constant(-1.0), "value", "-1.0"),
    ("rules-constant-type", lambda c: tfl.rules.constant("one"), "value", "'one'"),
    ("register-activation-lipschitz", lambda c: tfl.register_activation(_halve, float("inf")),
     "lipschitz", "inf"),
    ("register-activation-slopes", lambda c: tfl.register_activation(_halve, 0.5, (0.5, 0.0)),
     "slope_range", "(0.5, 0.0)"),
    # TensorFlow graphs
    ("register-op-rule-type", lambda c: tfgraph.register_op_rule("", tfgraph.linear_rule()),
     "op_type", "''"),
    ("register-op-rule-callable", lambda c: tfgraph.register_op_rule("MyOp", 1.0), "rule",
     "1.0"),
    ("elementwise-rule", lambda c: tfgraph.elementwise_rule(-2.0), "lipschitz", "-2.0"),
    ("graph-estimator-tol", lambda c: tfl.GraphEstimator(c.fn, c.spec, tol=0), "tol", "0"),
    ("graph-estimator-solver", lambda c: tfl.GraphEstimator(c.fn, c.spec, solver="svd"),
     "solver", "'svd'"),
    ("graph-estimator-max-products",
     lambda c: tfl.GraphEstimator(c.fn, c.spec, max_products=-5), "max_products", "-5"),
    ("graph-estimator-lower-unknown", lambda c: c.graph_est.lower_bound(nrandom=4), "nrandom",
     "n_random"),
    ("autolip-function-tol", lambda c: tfl.autolip_function(c.fn, c.spec, tol=1.0), "tol",
     "1.0"),
    ("autolip-function-unknown", lambda c: tfl.autolip_function(c.fn, c.spec, tolerance=1e-3),
     "tolerance", "tol"),
    ("autolip-function-input-shape",
     lambda c: tfl.autolip_function(c.fn, c.spec, input_shape=(4,)), "input_shape", "(4,)"),
    ("autolip-function-signature-type", lambda c: tfl.autolip_function(c.fn, [3]),
     "input_signature", "3"),
    ("autolip-function-no-signature", lambda c: tfl.autolip_function(_halve), "input_signature",
     "_halve"),
    ("graph-estimator-path", lambda c: tfl.GraphEstimator(c.saved), "from_saved_model",
     "sm"),
    ("autolip-saved-model-path", lambda c: tfl.autolip_saved_model(c.saved + "_missing"),
     "path", "sm_missing"),
    ("autolip-saved-model-signature",
     lambda c: tfl.autolip_saved_model(c.saved, "serving_default"), "signature",
     "'serving_default'"),
    ("autolip-saved-model-tol", lambda c: tfl.autolip_saved_model(c.saved, tol=-1e-3), "tol",
     "-0.001"),
    ("autolip-saved-model-unknown",
     lambda c: tfl.autolip_saved_model(c.saved, max_product=10), "max_product", "max_products"),
]


@pytest.mark.parametrize("call, name, value", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_argument_raises_invalid_argument_error(ctx, call, name, value):
    with pytest.raises(tfl.InvalidArgumentError) as info:
        call(ctx)
    err = info.value
    assert isinstance(err, tfl.LipschitzError) and isinstance(err, ValueError)
    assert isinstance(err, TypeError)  # ``except TypeError`` (a wrong type) still catches it
    message = str(err)
    assert name in message, message
    assert value in message, message


def test_unknown_option_lists_the_accepted_ones(ctx):
    with pytest.raises(tfl.InvalidArgumentError) as info:
        ctx.est.seqlip(topk=3)
    message = str(info.value)
    assert "did you mean 'top_k'" in message
    for option in ("top_k", "max_exact_width", "remainder", "split", "subspace_tol"):
        assert option in message
    for set_by_the_estimator in ("spectral", "model_name"):
        assert set_by_the_estimator not in message


def test_saved_model_errors_keep_their_builtin_classes(ctx):
    """The CLI (and user code) catch OSError / KeyError from load_signature."""
    with pytest.raises(FileNotFoundError):
        tfgraph.load_signature(ctx.saved + "_missing")
    with pytest.raises(KeyError) as info:
        tfgraph.load_signature(ctx.saved, "nope")
    assert str(info.value).startswith("SavedModel")  # the message, not KeyError's repr


def test_valid_arguments_still_accepted(ctx):
    """Integral floats, NumPy integers and the largest tolerance pass the checks."""
    est = tfl.LipschitzEstimator(ctx.model, tol=0.1, max_products=np.int64(50), verbose=0)
    assert est.autolip().upper > 0
    rep = ctx.est.seqlip(top_k=np.int32(4), max_exact_width=8.0, remainder=np.bool_(True))
    assert rep.upper > 0


def test_non_argument_failures_are_lipschitz_errors():
    """A non-finite weight matrix is not a bad argument, but still a LipschitzError."""
    with pytest.raises(tfl.LipschitzError, match="NaN or inf"):
        certify.max_singular_value(np.array([[1.0, np.nan]]))
