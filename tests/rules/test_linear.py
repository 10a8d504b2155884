"""Every linear layer's measured operator norm against the SVD of its dense matrix.

The dense matrix is built from the layer itself (``layer(e_i) − layer(0)`` on the standard
basis), independently of the rule's linear function.
"""

import keras
import numpy as np
import pytest

import tf_lipschitz as tfl

from groundtruth import exact_norm

L = keras.layers


CASES = [
    ("dense", lambda: L.Dense(7), (5,)),
    ("einsum", lambda: L.EinsumDense("ab,bc->ac", output_shape=6, bias_axes="c"), (4,)),
    ("einsum3d", lambda: L.EinsumDense("abc,cd->abd", output_shape=(3, 5)), (3, 4)),
]
for stride in (1, 2):
    for padding in ("same", "valid"):
        CASES += [
            (f"conv1d-s{stride}-{padding}", lambda s=stride, p=padding: L.Conv1D(3, 3, strides=s, padding=p), (9, 2)),
            (f"conv2d-s{stride}-{padding}", lambda s=stride, p=padding: L.Conv2D(3, 3, strides=s, padding=p), (7, 6, 2)),
            (f"conv3d-s{stride}-{padding}", lambda s=stride, p=padding: L.Conv3D(2, 2, strides=s, padding=p), (4, 4, 4, 2)),
            (f"dwconv1d-s{stride}-{padding}", lambda s=stride, p=padding: L.DepthwiseConv1D(3, strides=s, padding=p, depth_multiplier=2), (9, 2)),
            (f"dwconv2d-s{stride}-{padding}", lambda s=stride, p=padding: L.DepthwiseConv2D(3, strides=s, padding=p), (7, 7, 2)),
            (f"sepconv1d-s{stride}-{padding}", lambda s=stride, p=padding: L.SeparableConv1D(3, 3, strides=s, padding=p), (9, 2)),
            (f"sepconv2d-s{stride}-{padding}", lambda s=stride, p=padding: L.SeparableConv2D(3, 3, strides=s, padding=p), (7, 7, 2)),
            (f"tconv1d-s{stride}-{padding}", lambda s=stride, p=padding: L.Conv1DTranspose(3, 3, strides=s, padding=p), (5, 2)),
            (f"tconv2d-s{stride}-{padding}", lambda s=stride, p=padding: L.Conv2DTranspose(3, 3, strides=s, padding=p), (4, 5, 2)),
            (f"tconv3d-s{stride}-{padding}", lambda s=stride, p=padding: L.Conv3DTranspose(2, 2, strides=s, padding=p), (3, 3, 3, 2)),
        ]
for padding in ("same", "valid"):
    CASES += [
        (f"conv1d-d2-{padding}", lambda p=padding: L.Conv1D(3, 3, dilation_rate=2, padding=p), (10, 2)),
        (f"conv2d-d2-{padding}", lambda p=padding: L.Conv2D(3, 3, dilation_rate=2, padding=p), (8, 8, 2)),
        (f"dwconv2d-d2-{padding}", lambda p=padding: L.DepthwiseConv2D(3, dilation_rate=2, padding=p), (8, 8, 2)),
        (f"sepconv2d-d2-{padding}", lambda p=padding: L.SeparableConv2D(3, 3, dilation_rate=2, padding=p), (8, 8, 2)),
    ]
CASES += [
    ("conv2d-groups", lambda: L.Conv2D(4, 3, groups=2, padding="same"), (6, 6, 4)),
    ("conv2d-rect-stride", lambda: L.Conv2D(3, (3, 2), strides=(2, 1)), (7, 6, 2)),
    ("avgpool2d-overlap", lambda: L.AveragePooling2D(3, 2, padding="same"), (7, 7, 2)),
    ("avgpool1d", lambda: L.AveragePooling1D(2), (8, 2)),
    ("avgpool3d", lambda: L.AveragePooling3D(2, 1), (3, 3, 3, 1)),
    ("gap2d", lambda: L.GlobalAveragePooling2D(), (4, 5, 3)),
    ("gap1d", lambda: L.GlobalAveragePooling1D(), (6, 3)),
    ("upsampling2d-nearest", lambda: L.UpSampling2D((2, 3)), (3, 3, 2)),
    ("upsampling2d-bilinear", lambda: L.UpSampling2D(2, interpolation="bilinear"), (3, 3, 2)),
    ("upsampling1d", lambda: L.UpSampling1D(3), (4, 2)),
    ("zeropad2d", lambda: L.ZeroPadding2D(1), (3, 3, 2)),
    ("cropping2d", lambda: L.Cropping2D(1), (5, 5, 2)),
    ("flatten", lambda: L.Flatten(), (3, 2, 2)),
    ("permute", lambda: L.Permute((2, 1)), (3, 4)),
    ("repeat", lambda: L.RepeatVector(3), (4,)),
    ("rescaling", lambda: L.Rescaling(-2.5, offset=1.0), (6,)),
]


@pytest.mark.parametrize("make,shape", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_operator_norm_matches_dense_svd(make, shape, rng):
    layer = make()
    model = keras.Sequential([keras.Input(shape), layer])
    if layer.weights:
        layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.weights])
    exact = exact_norm(layer, shape)
    report = tfl.LipschitzEstimator(model, verbose=0, tol=1e-10, max_products=4000).autolip()
    row = report.layers[-1]
    assert row.norm == pytest.approx(exact, rel=1e-4)
    assert report.upper == pytest.approx(exact, rel=1e-4)
    if row.method == "closed-form":
        assert report.certified


@pytest.mark.parametrize("activation,constant", [("relu", 1.0), ("sigmoid", 0.25), ("tanh", 1.0)])
def test_layer_activation_multiplies_norm(activation, constant, rng):
    layer = L.Dense(4, activation=activation)
    model = keras.Sequential([keras.Input((3,)), layer])
    w = np.asarray(layer.kernel)
    report = tfl.LipschitzEstimator(model, verbose=0, tol=1e-10).autolip()
    exact = np.linalg.svd(w, compute_uv=False)[0]
    assert report.upper == pytest.approx(constant * exact, rel=1e-4)
    assert report.layers[-1].activation == activation


def test_batchnorm_fuses_with_conv(rng):
    conv = L.Conv2D(4, 3, strides=2, padding="same", use_bias=False)
    bn = L.BatchNormalization()
    model = keras.Sequential([keras.Input((6, 6, 3)), conv, bn])
    bn.set_weights([rng.uniform(0.5, 2, 4).astype("float32"), rng.standard_normal(4).astype("float32"),
                    rng.standard_normal(4).astype("float32"), rng.uniform(0.5, 2, 4).astype("float32")])
    est = tfl.LipschitzEstimator(model, verbose=0, tol=1e-10)
    report = est.autolip()
    assert len(report.layers) == 2  # input + one fused row
    assert "+" in report.layers[1].name

    exact = exact_norm([conv, bn], (6, 6, 3))
    assert report.upper == pytest.approx(exact, rel=1e-4)
    gamma, _, _, var = bn.get_weights()
    bn_norm = np.max(np.abs(gamma / np.sqrt(var + bn.epsilon)))
    product = exact_norm(conv, (6, 6, 3)) * bn_norm
    assert report.upper <= product * (1 + 1e-5)  # fusing never loosens the bound


def test_convnext_layer_scale_is_a_certified_diagonal():
    from keras.src.applications.convnext import LayerScale

    from tf_lipschitz.rules.base import NodeContext, get_rule

    layer = LayerScale(0.5, 6)
    layer.build((None, 4, 6))
    layer.gamma.assign(np.array([0.3, -2.0, 1.0, 0.1, 0.0, 1.5], "float32"))
    bound = get_rule(layer)(layer, NodeContext(input_shapes=((4, 6),), output_shapes=((4, 6),)))
    assert bound.norm() == pytest.approx(2.0) and bound.certificate() == pytest.approx(2.0)
    x = np.random.default_rng(0).standard_normal((2, 4, 6)).astype("float32")
    np.testing.assert_allclose(np.asarray(bound.fn(x)), np.asarray(layer(x)), rtol=1e-6)
