"""Image resampling ops in TensorFlow graphs (tf_lipschitz.tfgraph's resampling rule).

``ResizeBilinear``, ``ResizeBicubic``, ``ResizeNearestNeighbor``, ``ResizeArea`` and
``ScaleAndTranslate`` with constant operands get the separable map ``R_h ⊗ R_w ⊗ I`` read
off the op, the exact norm ``‖R_h‖‖R_w‖`` and a certificate, as the Keras ``Resizing`` rule
does.
Ground truths: the dense matrix of the op from its values on basis vectors and its SVD
(tests/groundtruth.py), and the certified bound of the same model analysed from its layers.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz import tfgraph
from tf_lipschitz.errors import LowerBoundUnavailableError
from tf_lipschitz.tfgraph import UnsupportedOpError, autolip_function

from groundtruth import exact_norm

L = keras.layers
SHAPE = (5, 7, 2)  # (H, W, C): one axis shrinks and the other grows below
SIZE = (3, 9)


def _resize(op, **attrs):
    return lambda x: getattr(tf.raw_ops, op)(images=x, size=SIZE, **attrs)


def _scale_and_translate(kernel_type, antialias, translation=(0.5, -1.25)):
    scale = (SIZE[0] / SHAPE[0], SIZE[1] / SHAPE[1])
    return lambda x: tf.raw_ops.ScaleAndTranslate(
        images=x, size=SIZE, scale=scale, translation=translation, kernel_type=kernel_type,
        antialias=antialias)


_CENTERS = [dict(align_corners=False, half_pixel_centers=False),
            dict(align_corners=True, half_pixel_centers=False),
            dict(align_corners=False, half_pixel_centers=True)]
OPS = [(f"{op}-ac{int(c['align_corners'])}-hp{int(c['half_pixel_centers'])}", _resize(op, **c))
       for op in ("ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic") for c in _CENTERS]
OPS += [(f"ResizeArea-ac{int(a)}", _resize("ResizeArea", align_corners=a)) for a in (False, True)]
OPS += [(f"ScaleAndTranslate-{k}-aa{int(a)}", _scale_and_translate(k, a))
        for k, a in [("lanczos1", True), ("lanczos3", False), ("lanczos5", True),
                     ("gaussian", False), ("box", True), ("triangle", False),
                     ("keyscubic", True), ("mitchellcubic", False)]]


def _truth(fn, shape=SHAPE) -> float:
    """``σ_max`` of the op's dense matrix: the op on the zero and unit inputs (float32)."""
    return exact_norm(L.Lambda(fn), shape)


@pytest.mark.parametrize("fn", [c[1] for c in OPS], ids=[c[0] for c in OPS])
def test_resampling_op_has_its_dense_norm_certified(fn):
    truth = _truth(fn)
    spec = tf.TensorSpec([None, *SHAPE], tf.float32)
    certified = autolip_function(tf.function(fn), spec, certified=True)
    assert certified.certified and certified.layers[-1].bound_kind == "certified"
    assert truth <= certified.upper <= truth * (1 + 2e-6)
    estimate = autolip_function(tf.function(fn), spec)
    assert estimate.upper == pytest.approx(truth, rel=1e-6)


# Keras Resizing layers export as ResizeBilinear/NearestNeighbor/Bicubic/Area, or as
# ScaleAndTranslate (the other interpolations, and any antialiased one).
KERAS = [("bilinear", False), ("nearest", False), ("bicubic", False), ("area", False),
         ("lanczos3", False), ("lanczos5", True), ("bilinear", True), ("bicubic", True)]


@pytest.mark.parametrize("interpolation,antialias", KERAS,
                         ids=[f"{i}-aa{int(a)}" for i, a in KERAS])
def test_graph_bound_equals_the_keras_certified_bound(interpolation, antialias):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        L.Resizing(8, 4, interpolation=interpolation, antialias=antialias),
        L.Conv2D(2, 3, padding="same", activation="relu"), L.Flatten(), L.Dense(3)])
    layers = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    graph = autolip_function(tf.function(lambda x: model(x)), tf.TensorSpec([None, 6, 6, 2]),
                             certified=True)
    assert layers.certified and graph.certified
    assert graph.upper == pytest.approx(layers.upper, rel=1e-6)


@pytest.mark.parametrize("fn", [c[1] for c in OPS if c[0].endswith(("hp1", "ac1", "aa1"))],
                         ids=[c[0] for c in OPS if c[0].endswith(("hp1", "ac1", "aa1"))])
def test_resampling_then_convolution_is_certified_at_the_chains_norm(fn):
    # The fused chain is materialised through the rule's float64 map: the ops themselves
    # return float32 on float64 images, and the chain stayed an estimate.
    kernel = np.random.default_rng(5).standard_normal((3, 3, 2, 3)).astype("float32")

    def chain(x):
        return tf.nn.conv2d(fn(x), kernel, 1, "SAME")

    truth = _truth(chain)
    report = autolip_function(tf.function(chain), tf.TensorSpec([None, *SHAPE]), certified=True)
    assert report.certified
    assert truth <= report.upper <= truth * (1 + 1e-5)


def test_fixed_batch_is_one_example_of_the_rule():
    fn = _resize("ResizeBilinear", half_pixel_centers=True)
    truth = _truth(fn)  # of one image; two images apart: the same norm
    report = autolip_function(tf.function(fn), tf.TensorSpec([2, *SHAPE]), certified=True)
    assert report.certified and truth <= report.upper <= truth * (1 + 2e-6)


def test_half_precision_graph_is_certified():
    fn = _resize("ResizeBicubic", half_pixel_centers=True)
    truth = _truth(lambda x: fn(tf.cast(x, tf.float16)))
    report = autolip_function(tf.function(fn), tf.TensorSpec([None, *SHAPE], tf.float16),
                              certified=True)
    assert report.certified and report.upper == pytest.approx(truth, rel=1e-5)


def test_a_matrix_that_does_not_reproduce_the_op_is_refused(monkeypatch):
    # Read the matrices off the op, then check them against the op: a wrong R_d (here one
    # weight moved) is refused rather than bounded.
    def shifted(resample, n, axis=0):
        matrix = tfgraph_axis_matrix(resample, n, axis)
        matrix[0] = np.roll(matrix[0], 1)
        return matrix

    tfgraph_axis_matrix = tfgraph.axis_matrix
    monkeypatch.setattr(tfgraph, "axis_matrix", shifted)
    fn = _resize("ResizeBilinear", half_pixel_centers=True)
    with pytest.raises(UnsupportedOpError, match=r"ResizeBilinear.*differs from that map"):
        autolip_function(tf.function(fn), tf.TensorSpec([None, *SHAPE]))


def test_translation_from_the_input_is_refused():
    def fn(x):  # one example, no batch axis: the translation is the image's mean
        translation = tf.stack([tf.reduce_mean(x), 0.0])
        return tf.raw_ops.ScaleAndTranslate(images=x, size=(3, 3), scale=(0.5, 0.5),
                                            translation=translation)

    with pytest.raises(UnsupportedOpError, match="translation depends on the input"):
        autolip_function(tf.function(fn), tf.TensorSpec([1, 6, 6, 1]))


def test_lower_bound_through_a_resize_and_refusal_without_gradient():
    conv = np.random.default_rng(1).standard_normal((3, 3, 2, 2)).astype("float32")
    spec = tf.TensorSpec([None, *SHAPE])
    bilinear = tfgraph.GraphEstimator(
        tf.function(lambda x: tf.nn.conv2d(tf.image.resize(x, SIZE), conv, 1, "SAME")), spec)
    lower = bilinear.lower_bound(steps=3, population=2, seed=0)
    upper = bilinear.autolip(certified=True)
    assert 0.0 < lower.value <= upper.upper
    # ResizeArea has no gradient in TensorFlow, which the search needs: a clean refusal
    area = tfgraph.GraphEstimator(tf.function(lambda x: tf.image.resize(x, SIZE, "area")), spec)
    assert area.autolip(certified=True).certified
    with pytest.raises(LowerBoundUnavailableError, match="ResizeArea"):
        area.lower_bound(steps=1, population=2, seed=0)
