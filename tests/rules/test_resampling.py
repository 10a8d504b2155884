"""Resizing, CenterCrop, RandomCrop and adaptive pooling against ground truth.

The closed forms (``Π_d ‖R_d‖₂`` of the per-axis matrices) are compared with the SVD of the
layer's dense matrix, built from the layer itself (``layer(e_i) − layer(0)``, float32), the
certified bounds are checked to lie in ``[exact, 1.01·exact]``, and adaptive max pooling's
``√(Π_d overlap_d)`` against secant ratios of the layer and window counts read off the layer.
"""

import math

import keras
import numpy as np
import pytest

import tf_lipschitz as tfl
from tf_lipschitz import certify
from tf_lipschitz.rules.base import NodeContext, get_rule
from tf_lipschitz.rules.pooling import adaptive_pool_windows
from tf_lipschitz.rules.resampling import resize_matrix

from groundtruth import exact_norm

L = keras.layers
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5")

CASES = []
for _interp in INTERPOLATIONS:
    for _aa in (False, True):
        CASES += [
            (f"resize-{_interp}-aa{int(_aa)}-down",
             lambda i=_interp, a=_aa: L.Resizing(3, 4, interpolation=i, antialias=a), (5, 7, 2)),
            (f"resize-{_interp}-aa{int(_aa)}-up-cf",
             lambda i=_interp, a=_aa: L.Resizing(9, 5, interpolation=i, antialias=a,
                                                 data_format="channels_first"), (1, 4, 3)),
        ]
# (name, make, shape, plain): `plain` builds the same resize without the option; each geometry
# is chosen so that the option really crops or pads (the norms differ).
OPTION_CASES = [
    ("crop-width", dict(crop_to_aspect_ratio=True), (3, 4), (5, 7, 2), "channels_last"),
    ("crop-height", dict(crop_to_aspect_ratio=True), (3, 4), (8, 5, 1), "channels_last"),
    ("crop-up-cf", dict(crop_to_aspect_ratio=True, interpolation="bicubic"), (9, 5), (2, 4, 3),
     "channels_first"),
    ("pad-height", dict(pad_to_aspect_ratio=True), (4, 3), (5, 7, 2), "channels_last"),
    ("pad-width-fill", dict(pad_to_aspect_ratio=True, fill_value=2.5,
                            interpolation="lanczos3"), (3, 4), (7, 5, 1), "channels_last"),
    ("pad-up-cf-fill", dict(pad_to_aspect_ratio=True, fill_mode="constant", fill_value=-1.0,
                            interpolation="area"), (9, 4), (2, 4, 3), "channels_first"),
    ("crop-antialias", dict(crop_to_aspect_ratio=True, antialias=True,
                            interpolation="lanczos5"), (3, 4), (7, 5, 2), "channels_last"),
]
for _name, _kw, _size, _shape, _fmt in OPTION_CASES:
    CASES.append((f"resize-{_name}",
                  lambda k=_kw, s=_size, f=_fmt: L.Resizing(*s, data_format=f, **k), _shape))
CASES += [
    ("centercrop-crop", lambda: L.CenterCrop(3, 4), (5, 7, 2)),
    ("centercrop-crop-cf", lambda: L.CenterCrop(3, 4, data_format="channels_first"), (2, 5, 7)),
    ("centercrop-same", lambda: L.CenterCrop(5, 7), (5, 7, 1)),
    ("centercrop-one-axis-smaller", lambda: L.CenterCrop(6, 4), (5, 7, 2)),
    ("centercrop-smaller-cf", lambda: L.CenterCrop(9, 5, data_format="channels_first"), (1, 4, 3)),
    ("randomcrop-larger", lambda: L.RandomCrop(3, 4, seed=1), (5, 7, 2)),
    ("randomcrop-smaller-cf", lambda: L.RandomCrop(9, 5, data_format="channels_first"), (1, 4, 3)),
    ("adaptive-avg1d", lambda: L.AdaptiveAveragePooling1D(3), (7, 2)),
    ("adaptive-avg1d-up-cf", lambda: L.AdaptiveAveragePooling1D(5, data_format="channels_first"),
     (2, 3)),
    ("adaptive-avg2d", lambda: L.AdaptiveAveragePooling2D((3, 2)), (7, 5, 2)),
    ("adaptive-avg2d-cf", lambda: L.AdaptiveAveragePooling2D((4, 3), data_format="channels_first"),
     (2, 6, 7)),
    ("adaptive-avg3d", lambda: L.AdaptiveAveragePooling3D((2, 3, 2)), (5, 4, 3, 1)),
    ("adaptive-avg3d-cf", lambda: L.AdaptiveAveragePooling3D((3, 2, 4),
                                                             data_format="channels_first"),
     (2, 5, 3, 3)),
]


def _model(layer, shape):
    return keras.Sequential([keras.Input(shape), layer])


@pytest.mark.parametrize("make,shape", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_closed_form_is_the_dense_norm_and_certified(make, shape, rng):
    layer = make()
    model = _model(layer, shape)
    exact = exact_norm(layer, shape)
    # The rule's map (what fused chains and certificates use) is the layer's linear part.
    x = rng.standard_normal((2, *shape)).astype("float32")
    linear_part = np.asarray(layer(x, training=False)) - np.asarray(layer(0 * x, training=False))
    context = NodeContext(input_shapes=(shape,), output_shapes=(linear_part.shape[1:],))
    bound = get_rule(layer)(layer, context)
    np.testing.assert_allclose(np.asarray(bound.fn(x)), linear_part, rtol=1e-5, atol=1e-5)
    report = tfl.LipschitzEstimator(model, verbose=0).autolip()
    row = report.layers[-1]
    assert row.method == "closed-form"
    assert row.norm == pytest.approx(exact, rel=1e-5)
    assert report.certified
    certified = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    assert certified.certified
    assert exact <= certified.upper <= exact * 1.01


@pytest.mark.parametrize("name,options,size,shape,data_format", OPTION_CASES,
                         ids=[c[0] for c in OPTION_CASES])
def test_aspect_options_really_crop_or_pad(name, options, size, shape, data_format):
    plain = {k: v for k, v in options.items()
             if k in ("interpolation", "antialias")}
    with_option = exact_norm(L.Resizing(*size, data_format=data_format, **options), shape)
    without = exact_norm(L.Resizing(*size, data_format=data_format, **plain), shape)
    assert abs(with_option - without) > 1e-3 * without


def test_resize_matrix_is_the_op_on_unit_vectors():
    # Bilinear with half-pixel centers, 2 -> 4: weights 1, 3/4, 1/4 (exact binary fractions).
    np.testing.assert_array_equal(resize_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75],
                                                        [0, 1]])
    # Nearest selects one entry per row: norm √(largest number of copies).
    nearest = resize_matrix(3, 7, "nearest")
    assert set(np.unique(nearest)) == {0.0, 1.0} and np.all(nearest.sum(axis=1) == 1)


FUSED = [
    ("bicubic-aa", lambda: L.Resizing(3, 4, interpolation="bicubic", antialias=True), (5, 7, 2)),
    ("lanczos3", lambda: L.Resizing(3, 4, interpolation="lanczos3"), (5, 7, 2)),
    ("area-up", lambda: L.Resizing(9, 5, interpolation="area"), (4, 3, 2)),
    # The offsets of crops and pads do not change a layer's own norm, but they change the map,
    # hence the fused chain's norm.
    ("crop-aspect", lambda: L.Resizing(3, 4, crop_to_aspect_ratio=True), (5, 7, 2)),
    ("pad-aspect", lambda: L.Resizing(4, 3, pad_to_aspect_ratio=True, fill_value=1.0),
     (5, 7, 2)),
    ("centercrop", lambda: L.CenterCrop(3, 4), (4, 7, 2)),
    ("centercrop-smaller", lambda: L.CenterCrop(6, 4), (5, 7, 2)),
]


@pytest.mark.parametrize("make,shape", [c[1:] for c in FUSED], ids=[c[0] for c in FUSED])
def test_fused_chain_certificate_covers_the_dense_norm(make, shape, rng):
    conv, resample = L.Conv2D(3, 3, padding="same"), make()
    flatten, dense = L.Flatten(), L.Dense(5)
    model = keras.Sequential([keras.Input(shape), conv, resample, flatten, dense])
    for layer in (conv, dense):
        layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.weights])
    exact = exact_norm([conv, resample, flatten, dense], shape)
    report = tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True)
    assert len(report.layers) == 2  # the input row and one fused group
    assert report.certified
    assert exact <= report.upper <= exact * 1.01
    estimate = tfl.LipschitzEstimator(model, verbose=0, tol=1e-8).autolip()
    assert estimate.upper == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_resize_then_conv_above_the_dense_limit_is_certified_exactly(seed, monkeypatch):
    """A Resizing fused with the convolution after it, too large for the dense route (forced
    here; 28×28 → 32×32 → 16 filters is, at 784 × 16384): the product of the two norms was
    22-56 % above the chain's norm. The chain is materialised from its small side instead
    (within 4× the dense limit), or bounded through its Gram matrix (beyond)."""
    keras.utils.set_random_seed(seed)
    shape, out = (6, 6, 1), (8, 8, 4)
    resize, conv = L.Resizing(8, 8), L.Conv2D(4, 3, padding="same")
    model = keras.Sequential([keras.Input(shape), resize, conv])
    exact = exact_norm([resize, conv], shape)
    n = 36 * 8 * 8 * 4
    monkeypatch.setattr(certify, "_CHUNK_BYTES", 8 * 256 * 20)  # blocks of 20 of the 36 inputs
    for dense_limit, gram_limit, route in ((n // 2, 1 << 31, "matrix"), (n // 8, 1 << 31, "gram"),
                                           (n // 8, 0, None)):
        monkeypatch.setattr(certify, "DENSE_LIMIT", dense_limit)
        monkeypatch.setattr(certify, "CHAIN_GRAM_LIMIT", gram_limit)
        assert certify._chain_route(shape, out) == route
        (row,) = _linear_rows(tfl.LipschitzEstimator(model, verbose=0).autolip(certified=True))
        assert row.name == f"{resize.name}+{conv.name}"
        if route is None:  # the product of the two factors
            assert row.certificate > exact * 1.02
        else:
            assert exact <= row.certificate <= exact * (1 + 1e-4)


def _linear_rows(report):
    return [r for r in report.layers if r.kind == "linear"]


def test_randomcrop_is_the_identity_at_inference():
    layer = L.RandomCrop(3, 4, seed=0)
    model = _model(layer, (5, 7, 2))
    x = np.random.default_rng(0).standard_normal((1, 5, 7, 2)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), x)  # what the rule relies on
    report = tfl.LipschitzEstimator(model, verbose=0).autolip()
    assert report.upper == pytest.approx(1.0, rel=1e-12) and report.certified
    assert report.layers[-1].output_shape == (5, 7, 2)


class _SmartResizeCrop(L.RandomCrop):
    """A RandomCrop that center-crops and resizes at inference (as its docstring says)."""

    def transform_images(self, images, transformation, training=True):
        if training:
            return super().transform_images(images, transformation, training)
        return keras.preprocessing.image.smart_resize(images, (self.height, self.width))


class _PlainCenterCrop(L.RandomCrop):
    """A RandomCrop that crops the center at inference, without resizing."""

    def transform_images(self, images, transformation, training=True):
        if training:
            return super().transform_images(images, transformation, training)
        return L.CenterCrop(self.height, self.width)(images)


def test_randomcrop_that_resamples_at_inference_gets_the_smart_resize_bound():
    layer = _SmartResizeCrop(3, 4)
    report = tfl.LipschitzEstimator(_model(layer, (5, 7, 2)), verbose=0).autolip()
    assert "RandomCrop at inference: center crop" in report.layers[-1].note
    assert report.upper == pytest.approx(exact_norm(layer, (5, 7, 2)), rel=1e-5)


class _TransposedResize(L.Resizing):
    """Linear, but not R_h ⊗ R_w: the spatial axes are swapped after the resize."""

    def transform_images(self, images, transformation=None, training=True):
        return keras.ops.transpose(super().transform_images(images, transformation, training),
                                   (0, 2, 1, 3))


class _ClippedResize(L.Resizing):
    """Not linear: the resized image is clipped."""

    def transform_images(self, images, transformation=None, training=True):
        return keras.ops.clip(super().transform_images(images, transformation, training), -1, 1)


@pytest.mark.parametrize("make,shape", [
    (lambda: _TransposedResize(4, 4), (6, 6, 2)),
    (lambda: _ClippedResize(3, 4), (5, 7, 2)),
    (lambda: _PlainCenterCrop(3, 4), (5, 7, 2)),
], ids=["transposed", "clipped", "randomcrop-plain-crop"])
def test_layers_that_do_not_resample_as_modelled_are_refused(make, shape):
    layer = make()
    with pytest.raises(tfl.UnsupportedLayerError, match="separable linear map"):
        tfl.LipschitzEstimator(_model(layer, shape), verbose=0).autolip()


@pytest.mark.parametrize("op", ["adaptive_average_pool", "adaptive_max_pool"])
def test_adaptive_pooling_with_other_windows_is_refused(op, monkeypatch):
    real = getattr(keras.ops, op)

    def shifted(inputs, output_size, data_format=None):  # windows in reverse order
        return keras.ops.flip(real(inputs, output_size, data_format), axis=1)

    monkeypatch.setattr(keras.src.ops, op, shifted)
    layer = (L.AdaptiveAveragePooling1D if op == "adaptive_average_pool"
             else L.AdaptiveMaxPooling1D)(3)
    with pytest.raises(tfl.UnsupportedLayerError, match="adaptive pooling"):
        tfl.LipschitzEstimator(_model(layer, (7, 2)), verbose=0).autolip()


def test_mixed_precision_layers_are_checked_in_float32():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layers = [L.Resizing(3, 4, interpolation="bicubic"), L.AdaptiveMaxPooling2D((3, 2))]
        for layer in layers:
            report = tfl.LipschitzEstimator(_model(layer, (5, 7, 2)), verbose=0).autolip()
            assert report.certified
    finally:
        keras.config.set_dtype_policy(policy)
    # √(2·2): the windows (2, 3, 2 of 5 rows; 4, 4 of 7 columns) overlap twice on each axis.
    assert report.upper == pytest.approx(2.0, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Adaptive max pooling: √(Π_d overlap_d)
# ---------------------------------------------------------------------------------------------

MAX_CASES = [
    ("1d", lambda: L.AdaptiveMaxPooling1D(3), (7, 1)),
    ("1d-up-cf", lambda: L.AdaptiveMaxPooling1D(5, data_format="channels_first"), (1, 3)),
    ("2d", lambda: L.AdaptiveMaxPooling2D((3, 2)), (5, 7, 1)),
    ("2d-up", lambda: L.AdaptiveMaxPooling2D((5, 4)), (3, 3, 2)),
    ("2d-cf", lambda: L.AdaptiveMaxPooling2D((4, 3), data_format="channels_first"), (1, 6, 7)),
    ("3d", lambda: L.AdaptiveMaxPooling3D((2, 3, 2)), (5, 4, 3, 1)),
]


def _overlap_from_windows(spatial, output_size) -> int:
    """Π_d max_p #{windows of axis d containing p}, from adaptive_pool_windows."""
    total = 1
    for n, m in zip(spatial, output_size):
        counts = np.zeros(n, int)
        for start, size in adaptive_pool_windows(n, m):
            counts[start:start + size] += 1
        total *= int(counts.max())
    return total


@pytest.mark.parametrize("make,shape", [c[1:] for c in MAX_CASES], ids=[c[0] for c in MAX_CASES])
def test_adaptive_max_bound_is_the_worst_secant_ratio(make, shape, rng):
    layer = make()
    report = tfl.LipschitzEstimator(_model(layer, shape), verbose=0).autolip()
    bound = report.upper
    assert report.certified
    channels_last = layer.data_format == "channels_last"
    spatial = shape[:-1] if channels_last else shape[1:]
    assert bound == pytest.approx(math.sqrt(_overlap_from_windows(spatial, layer.output_size)))

    # Brute force on the layer itself: a bump at position p (all else 0) moves every output whose
    # window contains p by the bump, so its secant ratio is √(number of windows containing p),
    # and the worst position attains the bound.
    n = int(np.prod(shape))
    bumps = np.eye(n, dtype="float32").reshape((n, *shape))
    moved = np.asarray(layer(bumps)).reshape(n, -1)
    ratios = np.sqrt(np.sum(moved ** 2, axis=1))
    assert np.max(ratios) == pytest.approx(bound, rel=1e-6)

    # Random pairs, and pairs differing in one entry, never exceed the bound.
    x = rng.standard_normal((400, *shape)).astype("float32")
    step = rng.choice([1e-3, 1.0], (400,) + (1,) * len(shape))  # small and large moves
    y = x + (rng.standard_normal(x.shape) * step).astype("float32")
    y[:100] = x[:100]
    y[:100].reshape(100, -1)[np.arange(100), rng.integers(0, n, 100)] += 3.0
    num = np.linalg.norm((np.asarray(layer(x)) - np.asarray(layer(y))).reshape(400, -1), axis=1)
    den = np.linalg.norm((x - y).reshape(400, -1).astype(np.float64), axis=1)
    assert np.max(num / den) <= bound * (1 + 1e-6)


def test_adaptive_windows_match_keras_on_one_hot_inputs():
    # Each row of AdaptiveAveragePooling1D's dense matrix is 1/size on the window.
    for n in range(1, 12):
        for m in range(1, n + 4):
            layer = L.AdaptiveAveragePooling1D(m)
            try:
                layer(np.zeros((1, n, 1), "float32"))
            except Exception:  # noqa: BLE001 - Keras refuses some tiny sizes itself
                continue
            dense = np.asarray(layer(np.eye(n, dtype="float32").reshape(n, n, 1)))[..., 0].T
            for row, (start, size) in zip(dense, adaptive_pool_windows(n, m)):
                expected = np.zeros(n)
                expected[start:start + size] = 1 / size
                np.testing.assert_allclose(row, expected, rtol=1e-6, atol=1e-7)
