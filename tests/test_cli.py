"""The tf-lipschitz command line: results against the library, exit codes and messages."""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_lipschitz as tfl
from tf_lipschitz import cli
from tf_lipschitz.operators import LinearOperator

L = keras.layers


def _model():
    return keras.Sequential([
        keras.Input((6,)),
        L.Dense(10, activation="relu"),
        L.Dense(8, activation="tanh"),
        L.Dense(3),
    ], name="mlp")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One model saved as .keras, .h5 and a SavedModel, with its Keras-level AutoLip."""
    keras.utils.set_random_seed(11)
    root = tmp_path_factory.mktemp("models")
    model = _model()
    model.save(str(root / "mlp.keras"))
    model.save(str(root / "mlp.h5"))
    model.export(str(root / "exported"), verbose=False)
    upper = tfl.LipschitzEstimator(model, verbose=0).autolip().upper
    return {"root": root, "keras": str(root / "mlp.keras"), "h5": str(root / "mlp.h5"),
            "savedmodel": str(root / "exported"), "upper": upper}


@pytest.fixture(scope="module")
def conv_module(tmp_path_factory):
    """A fully convolutional tf.Module saved with a named signature and unknown image size."""
    root = tmp_path_factory.mktemp("conv")
    kernel = np.random.default_rng(12).standard_normal((3, 3, 1, 2)).astype("float32")

    class Net(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(kernel)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
        def score(self, x):
            return tf.nn.relu(tf.nn.conv2d(x, self.kernel, 2, "SAME"))

    net = Net()
    tf.saved_model.save(net, str(root / "conv"), signatures={"score": net.score})
    op = LinearOperator(lambda x: tf.nn.conv2d(x, kernel, 2, "SAME"), (6, 6, 1))
    sigma = float(np.linalg.svd(op.to_dense(), compute_uv=False)[0])
    return str(root / "conv"), sigma


def _save_module(path, fn, spec):
    module = tf.Module()
    module.f = tf.function(fn, input_signature=[spec])
    tf.saved_model.save(module, path, signatures={"serving_default": module.f})
    return path


def _run(capsys, *args):
    code = cli.main(["analyze", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_documents_every_flag(capsys):
    assert cli.main(["analyze", "--help"]) == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    analyze = parser._subparsers._group_actions[0].choices["analyze"]
    for action in analyze._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, action.dest
    assert cli.main(["--help"]) == 0
    assert "analyze" in capsys.readouterr().out


def test_keras_file_with_json_and_plot(saved, tmp_path, capsys):
    out_json, out_png = tmp_path / "report.json", tmp_path / "layers.png"
    code, out, err = _run(capsys, saved["keras"], "--json", out_json, "--plot", out_png,
                          "--lower-starts", "2", "--lower-steps", "3")
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "tf_lipschitz.analyze/1"
    assert doc["format"] == "keras" and doc["analysis"] == "keras-layers"
    assert doc["input_shape"] == [6]
    report = doc["reports"]["autolip"]
    assert report["schema"] == "tf_lipschitz.report/1"
    assert report["upper"] == pytest.approx(saved["upper"], rel=1e-3)
    assert report["kind"] in ("estimate", "certified upper bound")
    assert doc["methods"] == ["autolip", "seqlip", "lower"]
    lower = doc["lower_bound"]["value"]
    assert 0 < lower <= report["upper"]
    assert report["lower"] == lower
    if hasattr(tfl.LipschitzEstimator, "seqlip"):
        assert doc["reports"]["seqlip"]["lower"] == lower
        assert "SeqLip upper bound" in out
    else:
        assert "seqlip" in doc["skipped"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "AutoLip upper bound" in out and "lower bound" in out
    assert "Layer (type)" in out  # the per-layer table
    assert "[tf-lipschitz" in err  # progress on stderr


def test_savedmodel_json_on_stdout_matches_keras(saved, capsys):
    code, out, err = _run(capsys, saved["savedmodel"], "--methods", "autolip", "--json", "-",
                          "--quiet")
    assert code == 0, err
    doc = json.loads(out)  # stdout holds the JSON document only
    assert doc["format"] == "savedmodel" and doc["analysis"] == "tf-graph"
    assert doc["signature"] == "serving_default"
    assert doc["reports"]["autolip"]["method"] == "autolip-graph"
    assert doc["reports"]["autolip"]["upper"] == pytest.approx(saved["upper"], rel=1e-3)


def test_h5_file(saved, capsys):
    code, out, err = _run(capsys, saved["h5"], "--methods", "autolip", "--quiet")
    assert code == 0, err
    value = float(out.split("AutoLip upper bound")[1].split()[0])
    assert value == pytest.approx(saved["upper"], rel=1e-3)


def test_seqlip_on_a_graph_is_skipped_with_a_reason(saved, capsys):
    code, out, err = _run(capsys, saved["savedmodel"], "--methods", "autolip,seqlip", "--quiet")
    assert code == 0, err
    assert "note: seqlip skipped: SeqLip needs the Keras layer structure" in err
    assert "seqlip:" in out and "skipped" in out


def test_quiet_prints_only_the_bounds(saved, capsys):
    code, out, err = _run(capsys, saved["keras"], "--methods", "autolip", "--quiet")
    assert code == 0
    assert out.splitlines()[0].startswith("Lipschitz bounds for")
    assert "Layer (type)" not in out and "[tf-lipschitz" not in err


def test_signature_and_input_shape(conv_module, capsys):
    path, sigma = conv_module
    code, out, err = _run(capsys, path, "--signature", "score", "--input-shape", "1,6,6,1",
                          "--methods", "autolip", "--json", "-", "--quiet")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["input_shape"] == [6, 6, 1] and doc["signature"] == "score"
    assert doc["reports"]["autolip"]["upper"] == pytest.approx(sigma, rel=1e-4)
    # The same shape without the batch axis.
    code, out, _ = _run(capsys, path, "--input-shape", "6,6,1", "--methods", "autolip",
                        "--json", "-", "--quiet")
    assert code == 0
    assert json.loads(out)["reports"]["autolip"]["upper"] == pytest.approx(sigma, rel=1e-4)


def _halving_layer_module(tmp_path, name: str, rule: str):
    """Writes and imports ``<name>.py``: a layer ``Half`` (x ↦ x/2) registered with ``rule``."""
    module = tmp_path / f"{name}.py"
    module.write_text(textwrap.dedent(f"""
        import keras
        import tf_lipschitz as tfl

        class Half(keras.layers.Layer):
            def call(self, x):
                return 0.5 * x

        tfl.register_rule(Half, {rule})
        CUSTOM_OBJECTS = {{"Half": Half}}
    """))
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return module, mod


def test_custom_objects_module(tmp_path, capsys):
    module, mod = _halving_layer_module(tmp_path, "halve_layers", "tfl.rules.constant(0.5)")
    w = np.random.default_rng(13).standard_normal((4, 3)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, use_bias=False), mod.Half()])
    model.layers[0].kernel.assign(w)
    model.save(str(tmp_path / "halve.keras"))
    code, out, err = _run(capsys, tmp_path / "halve.keras", "--custom-objects", module,
                          "--methods", "autolip", "--json", "-", "--quiet")
    assert code == 0, err
    expected = 0.5 * float(np.linalg.svd(w, compute_uv=False)[0])
    assert json.loads(out)["reports"]["autolip"]["upper"] == pytest.approx(expected, rel=1e-4)


def test_custom_objects_file_imports_its_sibling_module(tmp_path, capsys, monkeypatch):
    # The console script (unlike `python -m`) has neither the file's folder nor the current
    # directory on sys.path: a custom-objects file importing a module beside it failed with
    # ModuleNotFoundError (exit 2).
    (tmp_path / "third_layers.py").write_text(textwrap.dedent("""
        import keras

        class Third(keras.layers.Layer):
            def call(self, x):
                return x / 3.0
    """))
    module = tmp_path / "third_objects.py"
    module.write_text(textwrap.dedent("""
        import tf_lipschitz as tfl
        from third_layers import Third

        tfl.register_rule(Third, tfl.rules.constant(1 / 3))
        CUSTOM_OBJECTS = {"Third": Third}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))  # only to build and save the model here
    from third_layers import Third

    model = keras.Sequential([keras.Input((2,)), Third()])
    model.save(str(tmp_path / "third.keras"))
    monkeypatch.undo()
    sys.modules.pop("third_layers", None)
    code, out, err = _run(capsys, tmp_path / "third.keras", "--custom-objects", module,
                          "--methods", "autolip", "--json", "-", "--quiet")
    assert code == 0, err
    assert json.loads(out)["reports"]["autolip"]["upper"] == pytest.approx(1 / 3, rel=1e-6)
    assert str(tmp_path) not in sys.path  # the folder is added only while importing


def test_subclassed_model_is_analysed_on_its_graph(tmp_path, capsys):
    module = tmp_path / "subclassed_net.py"
    module.write_text(textwrap.dedent("""
        import keras

        class Net(keras.Model):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.hidden = keras.layers.Dense(8, activation="relu")
                self.out = keras.layers.Dense(3)

            def call(self, x):
                return self.out(self.hidden(x))

        CUSTOM_OBJECTS = {"Net": Net}
    """))
    import importlib.util

    spec = importlib.util.spec_from_file_location("subclassed_net", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.Net()
    net(np.zeros((1, 5), "float32"))
    net.save(str(tmp_path / "net.keras"))
    args = [tmp_path / "net.keras", "--custom-objects", module, "--methods", "autolip",
            "--quiet"]
    expected = (np.linalg.svd(net.hidden.kernel.numpy(), compute_uv=False)[0]
                * np.linalg.svd(net.out.kernel.numpy(), compute_uv=False)[0])
    # The shape comes from --input-shape, or else from the shape the model was built on.
    for given in (["--input-shape", "1,5"], []):
        code, out, err = _run(capsys, *args, *given, "--json", "-")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["analysis"] == "tf-graph" and doc["input_shape"] == [5]
        assert doc["reports"]["autolip"]["upper"] == pytest.approx(expected, rel=1e-4)
    code, _, err = _run(capsys, *args, "--input-shape", "7")
    assert code == 2 and "--input-shape 7 does not fit input" in err and "(None, 5)" in err


@keras.saving.register_keras_serializable(package="tests_cli")
class _TwoDense(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = L.Dense(4, activation="relu")
        self.out = L.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


def test_subclassed_model_without_a_recorded_shape_names_the_flag(tmp_path, capsys,
                                                                   monkeypatch):
    net = _TwoDense()
    net(np.zeros((1, 5), "float32"))
    net.save(str(tmp_path / "net.keras"))
    monkeypatch.setattr(cli, "_built_input_shape", lambda model: None)  # as if never built
    code, _, err = _run(capsys, tmp_path / "net.keras", "--methods", "autolip", "--quiet")
    assert code == 2 and "has no recorded input shape; pass --input-shape" in err
    code, _, err = _run(capsys, tmp_path / "net.keras", "--methods", "autolip", "--quiet",
                        "--input-shape", "7")
    assert code == 2 and "fails on inputs of shape (None, 7)" in err and "\x1b" not in err
    assert "check --input-shape" in err
    # The failed trace left the model's Keras name scope on Keras' stack: every variable
    # created afterwards in the process was named "__two_dense/...".
    assert keras.Variable(1.0, name="probe").path == "probe"


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.keras").write_bytes(b"this is not a zip archive")
    (root / "corrupt.h5").write_bytes(b"this is not an HDF5 file")
    (root / "model.onnx").write_bytes(b"\x00")
    (root / "not_a_model").mkdir()
    (root / "corrupt_sm").mkdir()
    (root / "corrupt_sm" / "saved_model.pb").write_bytes(b"\x08\x01garbage\xff\xff")
    w = np.ones((6, 6), "float32")
    return {
        "root": root,
        "int": _save_module(str(root / "int_input"), lambda t: tf.cast(t, tf.float32) * 2.0,
                            tf.TensorSpec([None, 6], tf.int32)),
        "asinh": _save_module(str(root / "asinh"), lambda x: tf.asinh(x @ w),
                            tf.TensorSpec([None, 6], tf.float32)),
        "product": _save_module(str(root / "product"), lambda x: (x @ w) * x,
                                tf.TensorSpec([None, 6], tf.float32)),
    }


@pytest.mark.parametrize("make_args, code, pattern", [
    (lambda b, s, c: [b["root"] / "missing.keras"], 2, r"^error: .*missing\.keras': no such file"),
    (lambda b, s, c: [b["root"] / "corrupt.keras"], 2,
     r"^error: .*corrupt\.keras' is not a \.keras archive"),
    (lambda b, s, c: [b["root"] / "corrupt.h5"], 2, r"^error: .*corrupt\.h5' is not an HDF5 file"),
    (lambda b, s, c: [b["root"] / "model.onnx"], 2, r"^error: .*unrecognised model format"),
    (lambda b, s, c: [b["root"] / "not_a_model"], 2, r"^error: .*not a SavedModel"),
    (lambda b, s, c: [b["root"] / "corrupt_sm"], 2, r"^error: Could not read the SavedModel"),
    (lambda b, s, c: [s["savedmodel"], "--signature", "nope"], 2,
     r"^error: .*no signature 'nope'; available signatures: serve, serving_default"),
    (lambda b, s, c: [c[0]], 2, r"^error: .*unknown dimensions.*--input-shape 1,224,224,1\)"),
    (lambda b, s, c: [c[0], "--input-shape", "1,6,6,3"], 2,
     r"^error: --input-shape .*does not fit"),
    (lambda b, s, c: [s["keras"], "--input-shape", "1,x"], 2, r"^error: .*invalid shape '1,x'"),
    (lambda b, s, c: [s["keras"], "--methods", "autolip,magic"], 2, r"^error: .*unknown method"),
    (lambda b, s, c: [s["keras"], "--tol", "inf"], 2, r"^error: .*--tol.*tolerance in \(0, 0.1\]"),
    (lambda b, s, c: [s["keras"], "--tol", "0.9"], 2, r"^error: .*--tol.*tolerance in \(0, 0.1\]"),
    (lambda b, s, c: [s["keras"], "--json", b["root"] / "no_dir" / "r.json"], 2,
     r"^error: --json .*does not exist"),
    (lambda b, s, c: [b["int"]], 3, r"^unsupported model: .*dtype int32"),
    (lambda b, s, c: [b["asinh"]], 3, r"^unsupported model: No Lipschitz rule for TensorFlow "
                                      r"op 'Asinh' \(node '.*Asinh.*'\)"),
    (lambda b, s, c: [b["product"]], 3, r"^unsupported model: .*\(Mul\) is not globally "
                                        r"Lipschitz"),
    (lambda b, s, c: [s["keras"], "--methods", "lower", "--plot", b["root"] / "p.png"], 2,
     r"^error: --plot needs an upper-bound method"),
    (lambda b, s, c: [s["savedmodel"], "--methods", "seqlip"], 2,
     r"^error: none of the requested methods can run on this model \(seqlip: "),
], ids=["missing", "corrupt-keras", "corrupt-h5", "format", "dir", "corrupt-savedmodel", "signature",
        "unknown-dims", "shape-mismatch", "bad-shape", "bad-method", "tol-inf", "tol-large", "json-dir", "int-input",
        "unsupported-op", "not-lipschitz", "plot-without-upper", "nothing-runs"])
def test_errors_exit_code_and_one_line(make_args, code, pattern, bad_models, saved,
                                       conv_module, capsys):
    args = [*make_args(bad_models, saved, conv_module), "--quiet"]
    if "--methods" not in args:
        args += ["--methods", "autolip"]
    exit_code, out, err = _run(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert exit_code == code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


def test_multi_input_model_gets_both_bounds(tmp_path, capsys):
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    dense = L.Dense(2, use_bias=False)
    model = keras.Model([a, b], L.Add()([dense(a), b]))
    model.save(str(tmp_path / "two.keras"))
    code, out, err = _run(capsys, tmp_path / "two.keras", "--quiet", "--json", "-")
    assert code == 0, err
    doc = json.loads(out)
    assert "lower" not in doc["skipped"]
    # x = (a, b) -> W a + b: the constant with respect to both inputs is the largest singular
    # value of [W, I]; the model is linear, so the lower bound reaches it.
    exact = float(np.linalg.svd(np.concatenate([dense.kernel.numpy().T, np.eye(2)], 1),
                                compute_uv=False)[0])
    assert doc["lower_bound"]["value"] == pytest.approx(exact, rel=1e-4)
    assert doc["reports"]["autolip"]["upper"] >= exact * (1 - 1e-4)


def test_debug_shows_the_traceback(bad_models, capsys):
    code, _, err = _run(capsys, bad_models["asinh"], "--methods", "autolip", "--quiet", "--debug")
    assert code == 3
    assert "Traceback" in err and "UnsupportedOpError" in err


def test_python_dash_m_runs_the_cli(saved):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "tf_lipschitz", "analyze", saved["savedmodel"], "--methods",
         "autolip", "--json", "-", "--quiet"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["reports"]["autolip"]["upper"] == pytest.approx(saved["upper"], rel=1e-3)


def test_quiet_tensorflow_restores_the_log_levels():
    # The command quiets TensorFlow's Python loggers while it runs; main() called in a process
    # that goes on (a notebook, these tests) gets their levels back.
    from absl import logging as absl_logging

    logger = logging.getLogger("tensorflow")
    before = logger.level, absl_logging.get_verbosity()
    logger.setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        with cli._quiet_tensorflow(debug=False):
            assert logger.level == logging.ERROR
            assert absl_logging.get_verbosity() == absl_logging.ERROR
        assert logger.level == logging.INFO and absl_logging.get_verbosity() == absl_logging.INFO
        with cli._quiet_tensorflow(debug=True):
            assert logger.level == logging.INFO
    finally:
        logger.setLevel(before[0])
        absl_logging.set_verbosity(before[1])


def test_certified_summary_names_the_layer_left_an_estimate(tmp_path, capsys):
    module, mod = _halving_layer_module(
        tmp_path, "rough_layers", 'tfl.rules.constant(0.5, certified=False, note="guessed")')
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="dense"), mod.Half(name="rough")])
    model.save(str(tmp_path / "rough.keras"))
    code, out, err = _run(capsys, tmp_path / "rough.keras", "--custom-objects", module,
                          "--methods", "autolip", "--certified", "--quiet")
    assert code == 0, err
    assert "(estimate)" in out
    assert "not certified because of 'rough' (guessed)" in out
    code, out, err = _run(capsys, tmp_path / "rough.keras", "--custom-objects", module,
                          "--methods", "autolip", "--quiet")
    assert code == 0, err
    assert "not certified because" not in out  # estimate mode: nothing was asked


@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_certified_run_shows_certificate_progress_unless_quiet(saved, capsys, fmt):
    path = saved["keras"] if fmt == "keras" else saved["savedmodel"]
    code, _, err = _run(capsys, path, "--methods", "autolip", "--certified")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("certified AutoLip: ")]
    assert lines and " certificates, " in lines[-1], err
    assert "\x1b" not in err and "\r" not in err  # stderr is not a terminal here
    code, _, err = _run(capsys, path, "--methods", "autolip", "--certified", "--quiet")
    assert code == 0 and "certified AutoLip" not in err


def test_a_lower_bound_that_cannot_run_is_skipped_with_its_reason(tmp_path, capsys):
    # TensorFlow has no gradient for ResizeArea: the upper bounds are reported, the lower bound
    # is listed as skipped with the reason (it failed the whole command with a raw error).
    model = keras.Sequential([keras.Input((6, 6, 1)),
                              keras.layers.Resizing(3, 3, interpolation="area"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    path = tmp_path / "area.keras"
    model.save(str(path))
    code, out, err = _run(capsys, path, "--methods", "autolip,lower", "--certified",
                          "--lower-starts", "4", "--lower-steps", "1")
    assert code == 0, err
    assert "note: lower skipped: lower_bound of" in err and "ResizeArea" in err
    assert "certified upper bound" in out


def test_seqlip_large_flag_reaches_seqlip(tmp_path, capsys, monkeypatch):
    # The middle convolution (48 → 64 entries) made 'large': beyond the dense route (its SVD
    # would cost 3072 × 48 > 1e5 flops) and both sides above GRAM_SIDE=40. By default the CLI
    # keeps its AutoLip factor (no block subspace iteration) and says so; --seqlip-large
    # subspace runs the paper's SeqLip on it.
    from tf_lipschitz import seqlip

    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((4, 4, 2)), L.Conv2D(3, 3, padding="same", activation="relu"),
        L.Conv2D(4, 3, padding="same", activation="relu", name="mid"),
        L.Conv2D(1, 3, padding="same", activation="relu"), L.Flatten(), L.Dense(3)])
    path = tmp_path / "stack.keras"
    model.save(str(path))
    monkeypatch.setattr(seqlip, "GRAM_SIDE", 40)
    monkeypatch.setattr(seqlip, "DENSE_SVD_FLOPS", 100_000)
    iterate = seqlip.top_singular_triplets

    def refuse(*args, **kwargs):
        raise AssertionError("top_singular_triplets called")

    monkeypatch.setattr(seqlip, "top_singular_triplets", refuse)
    out_json = tmp_path / "default.json"
    code, out, err = _run(capsys, path, "--methods", "seqlip", "--json", out_json)
    assert code == 0, err
    settings = json.loads(out_json.read_text())["reports"]["seqlip"]["settings"]
    assert settings["large_operators"] == "autolip"
    assert [d["name"] for d in settings["autolip_operators"]] == ["mid"]
    assert "AutoLip factor kept for 1 large operator(s): mid (--seqlip-large subspace" in out
    assert "(AutoLip factor: large)" in out  # the table's row
    assert "warning: SeqLip kept the AutoLip factor of 1 operator(s)" in err
    cut = json.loads(out_json.read_text())["reports"]["seqlip"]["upper"]

    monkeypatch.setattr(seqlip, "top_singular_triplets", iterate)
    code, out, err = _run(capsys, path, "--methods", "seqlip", "--json", out_json,
                          "--seqlip-large", "subspace", "--quiet")
    assert code == 0, err
    report = json.loads(out_json.read_text())["reports"]["seqlip"]
    assert report["settings"]["large_operators"] == "subspace"
    assert report["settings"]["autolip_operators"] == []
    assert "AutoLip factor kept" not in out and "AutoLip factor of" not in err
    assert report["upper"] != pytest.approx(cut, rel=1e-3)  # 'mid' went into two pairs

    code, _, err = _run(capsys, path, "--seqlip-large", "dense")
    assert code == 2 and "--seqlip-large" in err and "invalid choice" in err

    # SeqLip before AutoLip: the summary names the kept operators, then AutoLip's line follows
    # (the list of names once replaced the table of method names: AttributeError)
    monkeypatch.setattr(seqlip, "top_singular_triplets", refuse)
    code, out, err = _run(capsys, path, "--methods", "seqlip,autolip", "--quiet")
    assert code == 0, err
    lines = out.splitlines()
    kept = next(i for i, line in enumerate(lines) if "AutoLip factor kept for 1" in line)
    assert lines[kept - 1].lstrip().startswith("SeqLip upper bound")
    assert lines[kept + 1].lstrip().startswith("AutoLip upper bound")
