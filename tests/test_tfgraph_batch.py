"""Functions that mix the examples of a batch are refused by the graph analysis.

The graph is analysed at batch size 1, i.e. as a function of one example. A function whose
outputs for one example read other examples (a reduction, transposition, roll or slice across
the batch axis) was silently bounded as a different function: ``x + sum(x, axis=0)`` got 2 for
a map whose constant on batches of B examples is B + 1, ``cumsum(x, axis=0)`` 1 for 1.618 at
B = 2. Ground truth that a function mixes examples: its value on a batch differs from its values
on each example alone (evaluated directly, without the library).
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_lipschitz import tfgraph
from tf_lipschitz.errors import LipschitzError
from tf_lipschitz.operators import LinearOperator
from tf_lipschitz.rules import Constant
from tf_lipschitz.tfgraph import BatchMixingError, autolip_function

_RNG = np.random.default_rng(30)
_W = tf.constant(_RNG.standard_normal((4, 4)).astype("float32"))
_I4 = np.eye(4, dtype="float32")


def _sigma(matrix) -> float:
    return float(np.linalg.svd(np.asarray(matrix, dtype="float64"), compute_uv=False)[0])


def _jacobian_norm(fn, shape) -> float:
    """Norm of the Jacobian of ``fn`` at 0 on inputs of ``shape`` (the norm of a linear ``fn``)."""
    x = tf.zeros(shape, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.cast(fn(tf.cast(x, tf.float32)), tf.float64)
    jacobian = tape.jacobian(y, x)
    return _sigma(tf.reshape(jacobian, [int(np.prod(y.shape)), int(np.prod(shape))]))


def _mixes_examples(fn, shape) -> bool:
    """Whether ``fn`` on a batch differs from ``fn`` on each of its examples alone, for some
    batch of 2 or 3 examples near 0 or far from it (where ReLUs shifted by -100 are on)."""
    for batch in (2, 3):
        for offset in (0.0, 200.0):
            x = tf.constant((offset + _RNG.standard_normal((batch, *shape))).astype("float32"))
            try:
                together = fn(x).numpy()
            except (tf.errors.InvalidArgumentError, ValueError):
                return True  # runs on one example, not on this batch
            alone = np.concatenate([fn(x[i:i + 1]).numpy() for i in range(batch)], axis=0)
            if together.shape != alone.shape or not np.allclose(together, alone, atol=1e-4):
                return True
    return False


def _sum_over_moved_batch(x):
    return tf.transpose(tf.reduce_sum(tf.nn.relu(tf.transpose(x)), axis=1, keepdims=True)) + x


def _max_pool_over_moved_batch(x):
    pooled = tf.nn.max_pool2d(tf.reshape(x, [1, -1, 4, 1]), [2, 1], 1, "SAME")
    return tf.reshape(pooled, [-1, 4])


def _unmixed_by_cancellation(x):
    """x + relu(m) − relu(−m) for the batch mean m, the difference taken by a matrix product:
    a dependence witness that gave both ReLUs the same weights would cancel to zero."""
    m = tf.reduce_mean(x, axis=0, keepdims=True)
    both = tf.concat([tf.nn.relu(m), tf.nn.relu(-m)], axis=-1)
    return x + both @ tf.constant(np.vstack([_I4, -_I4]))


# (id, function, example shape, op where the examples first interact)
MIXING = [
    ("minus_batch_mean", lambda x: x - tf.reduce_mean(x, axis=0), (4,), "Mean"),
    ("plus_batch_sum", lambda x: tf.reduce_sum(x, axis=0, keepdims=True) + x, (4,), "Sum"),
    ("sum_over_batch", lambda x: tf.reduce_sum(x, axis=0), (4,), "Sum"),
    ("roll_batch", lambda x: tf.roll(x, 1, axis=0), (4,), "Roll"),
    ("roll_batch_by_two", lambda x: tf.roll(x, 2, axis=0), (4,), "Roll"),  # identity at B=2
    ("reverse_batch", lambda x: tf.reverse(x, [0]), (4,), "ReverseV2"),
    ("cumsum_batch_reverse", lambda x: tf.cumsum(x, axis=0, reverse=True), (4,), "Cumsum"),
    ("softmax_over_batch", lambda x: tf.nn.softmax(x @ _W, axis=0), (4,), "Softmax"),
    ("all_ones_batch_matmul", lambda x: tf.ones([tf.shape(x)[0]] * 2) @ x, (4,), "MatMul"),
    ("transpose_reshape", lambda x: tf.reshape(tf.transpose(x), tf.shape(x)) @ _W, (4,),
     "Reshape"),
    ("transposed_batch_summed", _sum_over_moved_batch, (4,), "Sum"),
    ("max_pool_across_examples", _max_pool_over_moved_batch, (4,), "MaxPool"),
    ("minus_first_example", lambda x: x - x[0:1], (4,), "StridedSlice"),
    ("gather_reversed_batch", lambda x: tf.gather(x, tf.range(tf.shape(x)[0])[::-1]), (4,),
     "GatherV2"),
    ("minus_batch_max", lambda x: x - tf.reduce_max(x, axis=0, keepdims=True), (4,), "Max"),
    ("rows_of_a_constant", lambda x: x * tf.constant([[2.0], [-3.0]]), (4,), "Mul"),
    ("softmax_of_scalars", tf.nn.softmax, (), "Softmax"),
    # The Jacobian between examples is zero at inputs near 0 (the ReLU is off there).
    ("relu_off_batch_mean", lambda x: x + tf.nn.relu(tf.reduce_mean(x, 0) - 100.0), (4,),
     "Mean"),
    ("relu_off_roll", lambda x: x + tf.nn.relu(tf.roll(x, 1, 0) - 100.0), (4,), "Roll"),
    ("cancelling_relus", _unmixed_by_cancellation, (4,), "Mean"),
]


@pytest.mark.parametrize("fn,shape,op", [c[1:] for c in MIXING], ids=[c[0] for c in MIXING])
def test_function_mixing_examples_is_refused_at_the_op(fn, shape, op):
    assert _mixes_examples(fn, shape)
    with pytest.raises(BatchMixingError, match=rf"op '{op}' \(node '[^']+'\)") as info:
        autolip_function(fn, tf.TensorSpec([None, *shape], tf.float32))
    assert isinstance(info.value, (LipschitzError, ValueError)) and info.value.op_type == op
    assert "per example" in str(info.value) and "tf.TensorSpec([B, ...])" in str(info.value)


def test_batch_sum_bound_was_below_the_map_on_batches():
    """x + sum(x, axis=0) was bounded by 2; on B examples it is I + 11ᵀ (per feature), B + 1."""
    fn = lambda x: x + tf.reduce_sum(x, axis=0, keepdims=True)  # noqa: E731
    for batch in (2, 3):
        assert _jacobian_norm(fn, (batch, 4)) == pytest.approx(batch + 1)
    with pytest.raises(BatchMixingError, match="'Sum'"):
        autolip_function(fn, tf.TensorSpec([None, 4], tf.float32))
    # Declared as a batch of 3 (one input of shape (3, 4)), the map is bounded exactly.
    rep = autolip_function(fn, tf.TensorSpec([3, 4], tf.float32), certified=True)
    assert rep.upper == pytest.approx(4.0, rel=1e-9) and rep.upper >= 4.0 * (1 - 1e-12)


def test_mixing_in_half_precision_and_between_two_inputs():
    with pytest.raises(BatchMixingError, match="'Sum'"):
        autolip_function(lambda x: x + tf.reduce_sum(x, 0, keepdims=True),
                         tf.TensorSpec([None, 4], tf.float16))
    spec = tf.TensorSpec([None, 4], tf.float32)
    with pytest.raises(BatchMixingError, match="'Roll'"):
        autolip_function(lambda a, b: a + tf.roll(b, 1, 0), [spec, spec])


def _space_to_batch_conv(x):
    kernel = tf.constant(np.arange(8, dtype="float32").reshape(2, 2, 1, 2) - 3.0)
    blocks = tf.space_to_batch(x, [2, 2], [[0, 0], [0, 0]])  # examples interleaved in blocks
    return tf.batch_to_space(tf.nn.conv2d(blocks, kernel, 1, "SAME"), [2, 2], [[0, 0], [0, 0]])


# (id, linear per-example function, example shape): the batch axis moves or merges with
# another axis, examples never meet; the bound is the norm of the dense matrix at batch 1.
PER_EXAMPLE = [
    ("time_major_and_back", lambda x: tf.transpose(tf.transpose(x, [1, 0, 2]) @ _W, [1, 0, 2]),
     (3, 4)),
    ("batch_merged_with_time", lambda x: tf.reshape(tf.reshape(x, [-1, 4]) @ _W,
                                                    [tf.shape(x)[0], -1]), (3, 4)),
    ("output_merged_with_time", lambda x: tf.reshape(x, [-1, 2]) * 3.0, (4,)),
    ("space_to_batch", _space_to_batch_conv, (4, 4, 1)),
    ("feature_roll_reverse_cumsum", lambda x: tf.cumsum(tf.roll(tf.reverse(x, [1]), 2, 1), 1),
     (4,)),
    ("feature_gather", lambda x: 2.0 * tf.gather(x, [3, 0, 2, 2], axis=1), (4,)),
]


@pytest.mark.parametrize("fn,shape", [c[1:] for c in PER_EXAMPLE], ids=[c[0] for c in PER_EXAMPLE])
def test_per_example_functions_that_move_the_batch_axis_keep_their_bound(fn, shape):
    assert not _mixes_examples(fn, shape)
    truth = _sigma(LinearOperator(fn, shape).to_dense())
    rep = autolip_function(tf.function(fn, autograph=False),
                           tf.TensorSpec([None, *shape], tf.float32))
    assert rep.upper == pytest.approx(truth, rel=1e-4)


def test_nonlinear_per_example_ops_are_not_refused():
    """Max pools, reductions over features, softmax and a ReLU: 1-Lipschitz per example."""
    def fn(x):
        pooled = tf.nn.max_pool2d(tf.nn.relu(x), 2, 2, "VALID")  # disjoint windows
        return tf.nn.softmax(tf.reshape(pooled, [-1, 4]) - tf.reduce_max(x, axis=[1, 2]))

    assert not _mixes_examples(fn, (4, 4, 1))
    rep = autolip_function(fn, tf.TensorSpec([None, 4, 4, 1], tf.float32))
    assert rep.upper >= 1.0

    def halves(x):  # split and unstack along features, concatenated back
        first, second = tf.split(x, 2, axis=1)
        return tf.concat([second, tf.stack(tf.unstack(first, axis=1)[::-1], axis=1)], 1)

    assert not _mixes_examples(halves, (4,))
    rep = autolip_function(halves, tf.TensorSpec([None, 4], tf.float32))
    assert rep.upper >= _jacobian_norm(halves, (1, 4))


def test_functions_without_a_batch_axis_are_one_example():
    """A fixed leading dimension is not a batch axis: the whole tensor is one example."""
    fn = lambda x: x + tf.reduce_sum(x, axis=0, keepdims=True)  # noqa: E731
    rep = autolip_function(fn, tf.TensorSpec([1, 4], tf.float32))
    assert rep.upper == pytest.approx(2.0)  # 2x
    rep = autolip_function(lambda x: 2.0 * x, tf.TensorSpec([], tf.float32))
    assert rep.upper == pytest.approx(2.0)


def test_function_that_runs_on_one_example_only_is_analysed_at_batch_1():
    """A constant of batch size 1 in the graph: no batch of 2 exists, batch 1 is exact."""
    fn = lambda x: tf.transpose(x) @ tf.ones((1, 3))  # noqa: E731
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        fn(tf.ones((2, 4)))
    rep = autolip_function(fn, tf.TensorSpec([None, 4], tf.float32))
    assert rep.upper == pytest.approx(_jacobian_norm(fn, (1, 4)), rel=1e-5)


def test_registered_ops_keep_working():
    """An op registered with elementwise_rule is entrywise; one with a rule of its own is
    followed by its forward-mode product."""
    # asinh (|f'| ≤ 1): no built-in rule; erfc (|f'| ≤ 2/√π < 1.2): its built-in rule replaced
    builtin_erfc = tfgraph._OP_RULES["Erfc"]
    tfgraph.register_op_rule("Asinh", lambda ctx: Constant(1.0))
    tfgraph.register_op_rule("Erfc", tfgraph.elementwise_rule(1.2))
    try:
        spec = tf.TensorSpec([None, 4], tf.float32)
        assert autolip_function(lambda x: tf.asinh(x) + tf.math.erfc(x), spec).upper == \
            pytest.approx(2.2)
        with pytest.raises(BatchMixingError, match="'Sum'"):
            autolip_function(lambda x: tf.math.erfc(tf.reduce_sum(x, 0)), spec)
    finally:
        tfgraph._OP_RULES.pop("Asinh")
        tfgraph.register_op_rule("Erfc", builtin_erfc)
