"""Unary ops standing alone in TensorFlow graphs (tf_lipschitz.tfgraph) against ground truth.

``Erf``/``Erfc`` get ``sup |f'| = 2/√π``, checked against sampled Jacobian norms (float64 SVD)
and reached at 0; ops whose slope is unbounded (``Exp``, ``Log``, ``Square``, ``Pow``...) raise
``NotLipschitzError`` naming the node, the reason and what to do, and a sampled derivative
beyond 10³ shows the reason holds; composite activations that contain such ops keep their
constants; ``GatherNd`` with constant indices is measured against its dense Jacobian's SVD.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_lipschitz import tfgraph
from tf_lipschitz.errors import NotLipschitzError
from tf_lipschitz.rules.activations import activation_info
from tf_lipschitz.rules.base import Constant
from tf_lipschitz.tfgraph import BatchMixingError, UnsupportedOpError, autolip_function

from groundtruth import top_singular_value

SPEC = tf.TensorSpec([None, 5], tf.float32)
ERF_SLOPE = 2.0 / math.sqrt(math.pi)
_RNG = np.random.default_rng(11)


def _jacobian_norm(fn, x: np.ndarray) -> float:
    """Spectral norm of the dense float64 Jacobian of ``fn`` at ``x`` (one example, or the whole
    fixed-shape tensor)."""
    x = tf.constant(x, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    jacobian = tape.jacobian(y, x).numpy().reshape(int(np.prod(y.shape)), -1)
    return top_singular_value(jacobian)


@pytest.mark.parametrize("fn", [tf.math.erf, tf.math.erfc], ids=["erf", "erfc"])
def test_erf_alone_has_the_exact_constant_two_over_root_pi(fn):
    rep = autolip_function(fn, SPEC, certified=True)
    assert rep.certified and rep.layers[-1].bound_kind == "certified"
    assert ERF_SLOPE <= rep.upper <= ERF_SLOPE * (1 + 1e-12)
    samples = [_jacobian_norm(fn, 3.0 * _RNG.standard_normal((1, 5))) for _ in range(20)]
    assert max(samples) <= rep.upper
    # the sup is attained at 0, where erf' = 2/√π
    assert _jacobian_norm(fn, np.zeros((1, 5))) >= rep.upper - 1e-3


def test_erf_after_a_linear_map_multiplies_its_norm():
    w = _RNG.standard_normal((5, 4)).astype("float32")
    rep = autolip_function(lambda x: tf.math.erf(x @ w), SPEC, certified=True)
    assert rep.upper == pytest.approx(top_singular_value(w) * ERF_SLOPE, rel=1e-5)
    # the Jacobian at the input mapped to 0 (x = 0) is (2/√π)·Wᵀ: the bound is reached
    tight = _jacobian_norm(lambda x: tf.math.erf(x @ tf.cast(w, tf.float64)), np.zeros((1, 5)))
    assert tight == pytest.approx(rep.upper, rel=1e-5)


@pytest.mark.parametrize("fn, activation", [
    (tf.nn.gelu, activation_info("gelu")),
    (lambda h: 0.5 * h * (1.0 + tf.math.erf(h / tf.cast(tf.sqrt(2.0), h.dtype))),
     activation_info("gelu")),  # Erf inside
    (lambda h: tf.nn.gelu(h, approximate=True), activation_info("gelu", approximate=True)),  # Pow
    (tf.nn.silu, activation_info("silu")),
    (keras.activations.mish, activation_info("mish")),
], ids=["gelu", "gelu_erf_form", "gelu_tanh_pow", "silu", "mish"])
def test_composite_activations_win_over_their_ops_rules(fn, activation):
    """The ops of gelu (Erf, Erfc; Pow in the tanh form), silu and mish now have rules of their
    own: the whole activation is still recognised, with its constant."""
    w = _RNG.standard_normal((5, 4)).astype("float32")
    rep = autolip_function(lambda x: fn(x @ w), SPEC)
    assert rep.upper == pytest.approx(top_singular_value(w) * activation.lipschitz, rel=1e-5)
    assert "recognised" in rep.layers[-1].note


def test_erf_alone_and_inside_gelu_in_one_function():
    rep = autolip_function(lambda x: tf.nn.gelu(x) + tf.math.erf(x), SPEC)
    assert rep.upper == pytest.approx(activation_info("gelu").lipschitz + ERF_SLOPE, rel=1e-6)


# op type, function, words of the reason, a point where |f'| > 10³ (the slope is unbounded)
UNBOUNDED = {
    "exp": ("Exp", tf.exp, "eˣ is unbounded", 10.0),
    "expm1": ("Expm1", tf.math.expm1, "eˣ is unbounded", 10.0),
    "log": ("Log", tf.math.log, "1/x is unbounded", 1e-4),
    "log1p": ("Log1p", tf.math.log1p, "1/(1 + x) is unbounded", -1.0 + 1e-4),
    "sqrt": ("Sqrt", tf.sqrt, "1/(2√x) is unbounded", 1e-8),
    "rsqrt": ("Rsqrt", tf.math.rsqrt, "is unbounded as x → 0", 1e-3),
    "square": ("Square", tf.square, "d/dx x² = 2x is unbounded", 1e4),
    "reciprocal": ("Reciprocal", tf.math.reciprocal, "−1/x² is unbounded", 1e-2),
    "pow_2": ("Pow", lambda x: tf.pow(x, 2.0), "exponent p = 2", 1e4),
    "pow_half": ("Pow", lambda x: tf.pow(x, 0.5), "exponent p = 0.5", 1e-8),
    "pow_mixed": ("Pow", lambda x: tf.pow(x, tf.constant([1.0, 0.0, 3.0, 1.0, 1.0], x.dtype)),
                  "exponent p = 3", 1e3),
    "pow_of_base": ("Pow", lambda x: tf.pow(tf.constant(2.0, x.dtype), x), "base c = 2", 20.0),
    "pow_of_two": ("Pow", lambda x: tf.pow(x, x), "both depend on the input", 5.0),
    "squared_difference": ("SquaredDifference",
                           lambda x: tf.math.squared_difference(x, tf.constant(1.0, x.dtype)),
                           "2(x − y) is unbounded", 1e4),
    "squared_difference_of_two": ("SquaredDifference",
                                  lambda x: tf.math.squared_difference(x, 2.0 * x),
                                  "2(x − y) is unbounded", 1e4),
}


@pytest.mark.parametrize("op, fn, reason, point", UNBOUNDED.values(), ids=UNBOUNDED.keys())
def test_ops_with_unbounded_slopes_are_refused_with_the_reason(op, fn, reason, point):
    # ground truth: the slope at ``point`` exceeds 10³ (and grows further beyond it)
    assert _jacobian_norm(fn, np.full((1, 5), point)) > 1e3
    with pytest.raises(NotLipschitzError) as info:
        autolip_function(fn, SPEC)
    message = str(info.value)
    assert f"Op '{op}' ({op}) is not globally Lipschitz" in message  # the node and the op type
    assert reason in message
    assert f"register_op_rule('{op}', tfl.tfgraph.elementwise_rule(c))" in message
    assert "tf.clip_by_value" in message and "bounded activation" in message


def test_unbounded_op_after_a_linear_map_is_named_by_its_node():
    w = _RNG.standard_normal((5, 4)).astype("float32")
    with pytest.raises(NotLipschitzError, match=r"'energy' \(Square\).*2x is unbounded"):
        autolip_function(lambda x: tf.square(x @ w, name="energy") + 1.0, SPEC)


@pytest.mark.parametrize("fn, op", [
    # celu, squareplus and √(x² + 1) are recognised (test_tfgraph_norms.py): these near misses
    # of theirs are not
    (lambda x: tf.maximum(x, 0.0) + 0.5 * tf.math.expm1(tf.minimum(x, 0.0) / 1.0), "Expm1"),
    (lambda x: (x + tf.sqrt(2.0 * tf.square(x) + 4.0)) / 3.0, "Square"),
    (lambda x: tf.math.log(1.0 + tf.exp(x)), "Exp"),  # softplus written by hand
    (lambda x: tf.sqrt(0.5 * tf.square(x) + 1.0), "Square"),
], ids=["celu_like", "squareplus_like", "log_1_plus_exp", "sqrt_of_scaled_square"])
def test_unbounded_op_inside_an_unrecognised_function_is_not_called_non_lipschitz(fn, op):
    """These functions are Lipschitz as a whole (constant at most 1), but the reader bounds
    them op by op: the op with an unbounded slope is unsupported, not declared 'not
    Lipschitz'."""
    x = tf.constant(np.linspace(-30, 30, 600)[:, None], tf.float64)  # (0, a kink, left out)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    assert float(tf.reduce_max(tf.abs(tape.gradient(y, x)))) <= 1.0 + 1e-9  # Lipschitz
    with pytest.raises(UnsupportedOpError, match=rf"'{op}'.*may be Lipschitz as a whole"):
        autolip_function(fn, SPEC)


def test_unbounded_op_after_affine_maps_stays_not_lipschitz():
    with pytest.raises(NotLipschitzError, match=r"\(Exp\)"):
        autolip_function(lambda x: 3.0 * tf.exp(x) - 2.0, SPEC)


def test_exp_refusal_still_names_the_exponential_activation():
    with pytest.raises(NotLipschitzError, match="'exponential' activation"):
        autolip_function(keras.activations.exponential, SPEC)


@pytest.mark.parametrize("fn, shape, expected", [
    (lambda x: tf.pow(x, 1.0), (5,), 1.0),
    (lambda x: tf.pow(x, tf.constant([1.0, 0.0, 1.0, 1.0, 0.0], x.dtype)), (5,), 1.0),
    (lambda x: tf.pow(x[:, :1], tf.constant([[1.0, 1.0, 1.0]], x.dtype)), (5,), math.sqrt(3.0)),
    (lambda x: tf.pow(x, 0.0) + x, (5,), 1.0),
    (lambda x: tf.pow(1.0, x) + x, (5,), 1.0),
], ids=["identity", "identity_or_one", "broadcast_identity", "constant_one", "one_to_the_x"])
def test_pow_with_exponents_zero_or_one_is_lipschitz(fn, shape, expected):
    """x¹ = x and x⁰ = 1 (and 1ˣ = 1): slopes 1 and 0; a broadcast input copied 3 times: √3."""
    rep = autolip_function(fn, tf.TensorSpec([None, *shape], tf.float32), certified=True)
    assert rep.upper == pytest.approx(expected, rel=1e-9)
    samples = [_jacobian_norm(fn, 2.0 + _RNG.random((1, *shape))) for _ in range(5)]
    assert max(samples) == pytest.approx(expected, rel=1e-9)


def test_squared_difference_of_a_tensor_with_itself_is_unsupported():
    with pytest.raises(UnsupportedOpError, match=r"'SquaredDifference'.*\(x − x\)² = 0"):
        autolip_function(lambda x: tf.math.squared_difference(x, x), SPEC)


GATHERS = {
    # fixed leading dimension: the whole (3, 4) tensor is one example; (0, 1) taken 3 times
    "entries": (lambda x: tf.gather_nd(x, [[0, 1], [0, 1], [2, 3], [1, 0], [0, 1]]), [3, 4],
                math.sqrt(3.0)),
    "rows": (lambda x: tf.gather_nd(x, [[0], [0], [2]]), [3, 4], math.sqrt(2.0)),
    "nothing_repeated": (lambda x: tf.gather_nd(x, [[2, 1], [0, 3]]), [3, 4], 1.0),
    # per example (batch axis kept apart): features 1 taken 3 times
    "features_per_example": (
        lambda x: tf.transpose(tf.gather_nd(tf.transpose(x), [[1], [1], [4], [1]])),
        [None, 5], math.sqrt(3.0)),
    "after_a_matmul": (
        lambda x: tf.transpose(tf.gather_nd(tf.transpose(x @ tf.cast(_W, x.dtype)),
                                            [[0], [2], [2], [1]])),
        [None, 5], None),
    "slices_of_3d": (lambda x: tf.gather_nd(x, [[1, 0], [1, 0], [0, 2]]), [2, 3, 4],
                     math.sqrt(2.0)),
}
_W = _RNG.standard_normal((5, 3)).astype("float32")


GATHERS.update({  # tf.gather (GatherV2): the same selections along one axis
    "gather_features": (lambda x: tf.gather(x, [0, 0, 0, 1, 2], axis=1), [None, 4],
                        math.sqrt(3.0)),
    "gather_2d_indices": (lambda x: tf.gather(x, [[2, 0], [2, 2], [1, 2]], axis=2),
                          [None, 2, 3], 2.0),
    "gather_one_index": (lambda x: tf.gather(x, 1, axis=1), [None, 3, 2], 1.0),
    "gather_rows_of_fixed": (lambda x: tf.gather(x, [1, 1]), [3, 2], math.sqrt(2.0)),
})


@pytest.mark.parametrize("fn, shape, closed_form", GATHERS.values(), ids=GATHERS.keys())
def test_gathers_with_constant_indices_are_their_jacobians_norm(fn, shape, closed_form):
    """A gather is a selection with repeats: norm √(largest number of times one index is
    selected), exact and certified; the matmul before one makes a fused chain."""
    rep = autolip_function(fn, tf.TensorSpec(shape, tf.float32), certified=True)
    example = [1 if d is None else d for d in shape]
    exact = _jacobian_norm(fn, _RNG.standard_normal(example))
    assert rep.certified
    if closed_form is not None:  # √(largest number of times one entry is selected)
        assert exact == pytest.approx(closed_form, rel=1e-12)
        assert exact <= rep.upper <= exact * (1 + 1e-12)
    assert rep.upper == pytest.approx(exact, rel=1e-5)


def test_gather_closed_form_without_the_dense_route(monkeypatch):
    """Too large to materialise (forced), the gather's closed form certifies it alone."""
    from tf_lipschitz import certify

    monkeypatch.setattr(certify, "DENSE_LIMIT", 0)
    monkeypatch.setattr(certify, "CHAIN_GRAM_LIMIT", 0)
    fn = lambda x: tf.gather(x, [3, 3, 1, 3, 0, 0], axis=1)  # noqa: E731
    rep = autolip_function(fn, tf.TensorSpec([None, 5], tf.float32), certified=True)
    assert rep.certified and rep.upper == pytest.approx(math.sqrt(3.0), rel=1e-15)
    assert rep.upper >= math.sqrt(3.0)


def test_gather_with_batch_dims_is_measured():
    fn = lambda x: tf.gather(x, tf.constant([[1, 1], [0, 2]]), axis=2, batch_dims=1)  # noqa: E731
    rep = autolip_function(fn, tf.TensorSpec([2, 2, 3], tf.float32))
    assert rep.upper == pytest.approx(_jacobian_norm(fn, _RNG.standard_normal((2, 2, 3))),
                                      rel=1e-5)


def test_gather_nd_along_the_batch_axis_is_refused():
    with pytest.raises(BatchMixingError, match="'GatherNd'"):
        autolip_function(lambda x: tf.gather_nd(x, [[0, 1], [0, 2]]), SPEC)


def test_gather_nd_with_indices_from_the_input_is_refused(monkeypatch):
    """Indices computed from the input are refused: at the op computing them (ArgMax has no
    rule, a cast to integers is a step function), at GatherNd reading them when that op has a
    rule, and by GatherNd's rule itself for an input-dependent indices operand."""
    def fn(x):  # the entry of x @ 1 at the argmaxes of x's two columns
        return tf.gather_nd(x @ tf.ones((2, 3)), tf.argmax(x, axis=0, output_type=tf.int32))

    spec = tf.TensorSpec([3, 2], tf.float32)
    with pytest.raises(UnsupportedOpError, match="'ArgMax'"):
        autolip_function(fn, spec)
    monkeypatch.setitem(tfgraph._OP_RULES, "ArgMax", lambda ctx: Constant(0.0))
    with pytest.raises(NotLipschitzError, match=r"\(GatherNd\).*int32 tensor computed from"):
        autolip_function(fn, spec)
    ctx = tfgraph.OpContext(
        node_def=tf.compat.v1.NodeDef(name="g", op="GatherNd"), name="g",
        inputs=("c:0", "x:0"), dependent=(False, True), constants=(np.ones((3,)), None),
        input_shapes=((3,), (1, 1)), output_shape=(1,), dtype=tf.float32)
    with pytest.raises(UnsupportedOpError, match=r"'GatherNd'.*indices depend on the input"):
        tfgraph._OP_RULES["GatherNd"](ctx)
