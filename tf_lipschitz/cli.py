"""The ``tf-lipschitz`` command: Lipschitz bounds of saved models without writing code.

Usage::

    tf-lipschitz analyze model.keras
    tf-lipschitz analyze exported_savedmodel/ --json report.json --plot layers.png
    tf-lipschitz analyze exported_savedmodel/ --signature serving_default --input-shape 1,28,28,1
    python -m tf_lipschitz analyze ...

``.keras`` and ``.h5`` files are loaded with ``keras.saving.load_model`` and analysed layer by
layer with :class:`~tf_lipschitz.LipschitzEstimator`. SavedModel directories (``model.export()``,
``tf.saved_model.save()``) have no Keras structure left: they are analysed on their TensorFlow
graph by :class:`~tf_lipschitz.tfgraph.GraphEstimator`.

Exit codes: 0 success; 1 internal error; 2 bad arguments or unreadable path; 3 unsupported model
(an op or layer without a rule, a function that is not Lipschitz, a non-float input). Errors are
one line on stderr; ``--debug`` adds the traceback. Tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import logging
import os
import sys
import time
import traceback
import warnings
import zipfile
from typing import Any, Sequence, TextIO

from tf_lipschitz.errors import first_line

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3

METHODS = ("autolip", "seqlip", "lower")
SCHEMA = "tf_lipschitz.analyze/1"

__all__ = ["main", "build_parser", "analyze", "Analysis", "UsageError"]


class UsageError(Exception):
    """A bad argument or an unreadable path (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for part in text.split(";"):
        dims = [d.strip() for d in part.split(",") if d.strip()]
        try:
            shape = tuple(int(d) for d in dims)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid shape {part!r}: expected comma-separated integers such as 1,28,28,1"
            ) from None
        if not shape or any(d <= 0 for d in shape):
            raise argparse.ArgumentTypeError(
                f"invalid shape {part!r}: every dimension must be a positive integer"
            )
        shapes.append(shape)
    return shapes


def _parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}"
        )
    return tuple(dict.fromkeys(methods))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _tolerance(text: str) -> float:
    value = _positive_float(text)
    if not value <= 0.1:  # inf and nan included
        raise argparse.ArgumentTypeError(
            f"expected a relative tolerance in (0, 0.1], got {text!r} (a larger one would let "
            "an estimate stop far below the norm)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (exit code 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tf-lipschitz`` (every flag documented in ``--help``)."""
    from tf_lipschitz import __version__

    parser = _Parser(
        prog="tf-lipschitz",
        description="Lipschitz constant bounds (AutoLip, SeqLip, lower bounds) of saved Keras "
                    "and TensorFlow models.",
        epilog="Exit codes: 0 success, 1 internal error, 2 bad arguments or unreadable path, "
               "3 unsupported model. Documentation: docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"tf_lipschitz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser(
        "analyze",
        help="bound the Lipschitz constant of a .keras/.h5 file or a SavedModel directory",
        description="Bound the l2 Lipschitz constant of a saved model. Every number is labelled "
                    "as a certified upper bound, an estimate or a lower bound.",
        epilog="Examples:\n  tf-lipschitz analyze model.keras\n"
               "  tf-lipschitz analyze exported/ --json report.json --plot layers.png\n"
               "  tf-lipschitz analyze exported/ --signature serving_default "
               "--input-shape 1,28,28,1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH",
                   help="a .keras or .h5 model file, or a SavedModel directory (from "
                        "model.export() or tf.saved_model.save())")
    p.add_argument("--signature", metavar="NAME",
                   help="SavedModel signature to analyse (default: serving_default, or the only "
                        "signature); ignored for .keras/.h5 files")
    p.add_argument("--input-shape", metavar="SHAPE", type=_parse_shapes,
                   help="input shape, with or without the batch axis, e.g. 1,28,28,1 or 28,28,1; "
                        "needed when the model's input has unknown dimensions (the norm of a "
                        "convolution depends on the image size); separate several inputs with ';'")
    p.add_argument("--custom-objects", metavar="MODULE", action="append", default=[],
                   help="Python module (dotted name or path to a .py file) defining the custom "
                        "layers/functions of a .keras/.h5 model; its CUSTOM_OBJECTS dict is used "
                        "if present, else every public class and function it defines. Importing it "
                        "also runs its tfl.register_rule calls. Repeatable")
    p.add_argument("--methods", metavar="LIST", type=_parse_methods, default=METHODS,
                   help="comma-separated methods among autolip, seqlip, lower "
                        "(default: autolip,seqlip,lower); seqlip needs the Keras layer structure")
    p.add_argument("--certified", action="store_true",
                   help="use certified per-layer norms wherever they exist (AutoLip is reported "
                        "as certified only when every factor is)")
    p.add_argument("--seqlip-large", choices=("autolip", "subspace"), default="autolip",
                   help="SeqLip on an operator too large for a dense SVD or its Gram route "
                        "(both sides above 4096 entries, e.g. a VGG convolution): 'autolip' "
                        "(default) keeps its AutoLip factor and cuts the SeqLip chain there; "
                        "'subspace' decomposes it by block subspace iteration, the paper's "
                        "SeqLip, which can take up to half an hour per 224×224 VGG16 convolution")
    p.add_argument("--solver", choices=("lanczos", "power"), default="lanczos",
                   help="spectral-norm method for linear layers (default: lanczos)")
    p.add_argument("--tol", type=_tolerance, default=1e-6, metavar="TOL",
                   help="relative accuracy asked of the spectral solver, in (0, 0.1] "
                        "(default: 1e-6)")
    p.add_argument("--max-products", type=_positive_int, default=2000, metavar="N",
                   help="cap on operator products per linear operator (default: 2000)")
    p.add_argument("--lower-starts", type=_positive_int, default=256, metavar="N",
                   help="random points screened by the lower-bound search (default: 256)")
    p.add_argument("--lower-steps", type=_non_negative_int, default=25, metavar="N",
                   help="refinement steps of the lower-bound search (default: 25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", metavar="FILE", dest="json_path",
                   help="write the results as JSON (schema tf_lipschitz.analyze/1, see "
                        "docs/json_schema.md); '-' writes to stdout")
    p.add_argument("--plot", metavar="FILE.png",
                   help="write a bar chart of the per-layer constants (log scale; needs "
                        "matplotlib)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress output and no per-layer tables: only the final bounds")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks and TensorFlow log messages")
    return parser


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Analysis:
    """Everything ``tf-lipschitz analyze`` computed for one model.

    Attributes:
        path: The analysed path.
        format: ``"keras"``, ``"h5"`` or ``"savedmodel"``.
        analysis: ``"keras-layers"`` (layer rules) or ``"tf-graph"`` (op rules on the graph).
        signature: SavedModel signature, if any.
        input_shape: Per-example input shape analysed.
        methods: Methods requested.
        reports: Upper-bound reports by method (``"autolip"``, ``"seqlip"``).
        lower: The lower bound, if computed.
        skipped: Requested methods that could not run, with the reason.
        elapsed: Wall time in seconds.
    """

    path: str
    format: str
    analysis: str
    signature: str | None
    input_shape: tuple
    methods: tuple[str, ...]
    reports: dict[str, Any] = dataclasses.field(default_factory=dict)
    lower: Any = None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    elapsed: float = 0.0

    def to_dict(self) -> dict:
        """The JSON document (schema ``tf_lipschitz.analyze/1``, see docs/json_schema.md)."""
        from tf_lipschitz import __version__

        return {
            "schema": SCHEMA,
            "tf_lipschitz_version": __version__,
            "path": self.path,
            "format": self.format,
            "analysis": self.analysis,
            "signature": self.signature,
            "input_shape": list(self.input_shape),
            "methods": list(self.methods),
            "reports": {name: rep.to_dict() for name, rep in self.reports.items()},
            "lower_bound": None if self.lower is None else self.lower.to_dict(),
            "skipped": dict(self.skipped),
            "elapsed_seconds": self.elapsed,
        }

    def summary(self) -> str:
        """One line per number, each saying what kind of number it is."""
        lines = [f"Lipschitz bounds for '{self.path}' ({self.analysis}):"]
        names = {"autolip": "AutoLip", "seqlip": "SeqLip"}
        for method, rep in self.reports.items():
            lines.append(f"  {names.get(method, method) + ' upper bound':<22}{rep.upper:<14.6g}"
                         f"({rep.kind})")
            if rep.certification_note:
                lines.append(f"  {'':<22}{rep.certification_note}")
            large = rep.settings.get("autolip_operators") if method == "seqlip" else None
            if large:
                kept = ", ".join(d["name"] for d in large)
                lines.append(f"  {'':<22}AutoLip factor kept for {len(large)} large "
                             f"operator(s): {kept} (--seqlip-large subspace decomposes them)")
        if self.lower is not None:
            line = (f"  {'lower bound':<22}{self.lower.value:<14.6g}(lower bound; secant check "
                    f"{self.lower.secant:.6g})")
            best = min((r.upper for r in self.reports.values()), default=None)
            if best is not None and self.lower.value > 0:
                line += f"   gap best upper/lower: {best / self.lower.value:.4g}"
            lines.append(line)
        for method, reason in self.skipped.items():
            lines.append(f"  {method + ':':<22}skipped ({reason})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------


class _Progress:
    """Progress messages on stderr (silenced by ``--quiet``)."""

    def __init__(self, stream: TextIO, enabled: bool):
        self.stream = stream
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str):
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[tf-lipschitz {elapsed:6.1f}s] {message}", file=self.stream, flush=True)


def _check_writable(path: str | None, flag: str):
    if path is None or path == "-":
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")


def _plot(analysis: Analysis, path: str):
    """Writes a bar chart of the per-layer constants of the first report (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError(
            f"--plot needs matplotlib ({exc}); install it with `pip install matplotlib` or "
            "`pip install tf_lipschitz[plot]`"
        ) from None
    method, report = next(iter(analysis.reports.items()))
    rows = [r for r in report.layers if r.lipschitz is not None and r.lipschitz > 0]
    if not rows:
        raise UsageError(f"--plot {path}: the {method} report has no per-layer constants to plot")
    colors = {"certified": "#2a9d8f", "estimate": "#e9a23b"}
    width = max(6.0, 0.45 * len(rows) + 2.0)
    fig, ax = plt.subplots(figsize=(min(width, 40.0), 5.0))
    xs = range(len(rows))
    bars = ax.bar(xs, [r.lipschitz for r in rows],
                  color=[colors.get(r.bound_kind, "#888888") for r in rows])
    ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r.name if len(r.name) <= 32 else r.name[:29] + "..." for r in rows],
                       rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("per-layer Lipschitz constant (log scale)")
    ax.set_title(f"{os.path.basename(os.path.normpath(analysis.path))}: {method} upper bound "
                 f"{report.upper:.4g} ({report.kind})")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], loc="best",
              fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise UsageError(f"--plot {path}: cannot write the file ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _importable_from(folder: str):
    """``folder`` first on ``sys.path`` while a custom-objects module is imported: its sibling
    modules (and, for a module name, those of the current directory) import as they do under
    ``python -m tf_lipschitz``, which puts the current directory there itself."""
    folder = os.path.abspath(folder)
    added = folder not in [os.path.abspath(p or ".") for p in sys.path]
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            sys.path.remove(folder)


def _custom_objects(modules: Sequence[str]) -> dict[str, Any]:
    objects: dict[str, Any] = {}
    for name in modules:
        try:
            if name.endswith(".py") or os.path.sep in name:
                if not os.path.isfile(name):
                    raise UsageError(f"--custom-objects {name}: no such file")
                spec = importlib.util.spec_from_file_location(
                    os.path.splitext(os.path.basename(name))[0], name)
                module = importlib.util.module_from_spec(spec)
                with _importable_from(os.path.dirname(name) or "."):
                    spec.loader.exec_module(module)
            else:
                with _importable_from("."):
                    module = importlib.import_module(name)
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any import failure is a bad argument
            raise UsageError(f"--custom-objects {name}: cannot import it ({type(exc).__name__}: "
                             f"{exc})") from None
        found = getattr(module, "CUSTOM_OBJECTS", None)
        if found is None:
            found = {
                k: v for k, v in vars(module).items()
                if not k.startswith("_") and callable(v)
                and getattr(v, "__module__", None) == module.__name__
            }
        objects.update(found)
    return objects


def _format_of(path: str) -> str:
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f))
               for f in ("saved_model.pb", "saved_model.pbtxt")):
            return "savedmodel"
        raise UsageError(f"'{path}' is a directory but not a SavedModel (no saved_model.pb)")
    if not os.path.exists(path):
        raise UsageError(f"'{path}': no such file or directory")
    if not os.access(path, os.R_OK):
        raise UsageError(f"'{path}': permission denied")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".keras":
        if not zipfile.is_zipfile(path):
            raise UsageError(f"'{path}' is not a .keras archive (not a zip file); save the model "
                             "with model.save('model.keras')")
        return "keras"
    if ext in (".h5", ".hdf5"):
        import h5py  # a Keras dependency

        if not h5py.is_hdf5(path):
            raise UsageError(f"'{path}' is not an HDF5 file")
        return "h5"
    raise UsageError(f"'{path}': unrecognised model format '{ext or '(no extension)'}'; expected "
                     "a .keras or .h5 file or a SavedModel directory")


def _per_example(shape: tuple[int, ...], spec: Sequence[Any], name: str) -> tuple[int, ...]:
    """The per-example shape from a user shape given with or without the batch axis."""
    spec = list(spec)
    example = shape[1:] if len(shape) == len(spec) else shape
    if len(example) != len(spec) - 1 or any(
        s is not None and s != d for s, d in zip(spec[1:], example)
    ):
        raise UsageError(
            f"--input-shape {','.join(map(str, shape))} does not fit input '{name}' of shape "
            f"{tuple(spec)} (batch axis first)"
        )
    return tuple(example)


def _input_shapes(given, specs: Sequence[tuple[str, Sequence[Any]]]):
    """Per-example input shapes for every input; unknown dimensions need --input-shape."""
    if given is not None and len(given) != len(specs):
        raise UsageError(f"--input-shape gives {len(given)} shape(s) for a model with "
                         f"{len(specs)} input(s); separate shapes with ';'")
    shapes = []
    for i, (name, spec) in enumerate(specs):
        if spec is None:
            if given is None:
                raise UsageError(f"input '{name}' has an unknown rank; pass --input-shape")
            # No recorded shape to compare with: a leading 1 is taken as the batch axis.
            shape = tuple(given[i])
            shapes.append(shape[1:] if len(shape) > 1 and shape[0] == 1 else shape)
            continue
        if given is not None:
            shapes.append(_per_example(tuple(given[i]), spec, name))
        elif any(d is None for d in list(spec)[1:]):
            example = ",".join(["1"] + [str(d) if d is not None else "224" for d in spec[1:]])
            raise UsageError(
                f"input '{name}' has shape {tuple(spec)} with unknown dimensions; the operator "
                "norm of a convolution depends on the input size, so pass --input-shape "
                f"(e.g. --input-shape {example})"
            )
        else:
            shapes.append(tuple(int(d) for d in list(spec)[1:]))
    return shapes


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


def _keras_target(args, fmt: str, progress: _Progress):
    import keras

    custom = _custom_objects(args.custom_objects)
    progress(f"loading {fmt} model {args.path}")
    try:
        model = keras.saving.load_model(args.path, custom_objects=custom or None, compile=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable model
        hint = ""
        text = str(exc)
        if any(k in text for k in ("Could not locate", "Unknown", "custom", "deserialize")):
            hint = " (if the model uses custom layers or functions, pass --custom-objects MODULE)"
        raise UsageError(f"cannot load '{args.path}': {first_line(exc)}{hint}") from exc
    if not isinstance(model, keras.Model):
        raise UsageError(f"'{args.path}' does not contain a Keras model")
    inputs = getattr(model, "inputs", None) or []
    specs = [(getattr(t, "name", f"input_{i}"), tuple(t.shape)) for i, t in enumerate(inputs)]
    layered = isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")
    if not specs:  # a subclassed model: its build config may record the shape it was built on
        recorded = _built_input_shape(model)
        if recorded is None and args.input_shape is None:
            raise UsageError(f"model '{model.name}' has no recorded input shape; pass "
                             "--input-shape")
        specs = [("input", recorded)]
    shapes = _input_shapes(args.input_shape, specs)
    if not layered:
        return _graph_from_keras(model, shapes, args, fmt, progress)
    from tf_lipschitz.estimator import LipschitzEstimator

    progress(f"reading the layer graph of '{model.name}'")
    est = LipschitzEstimator(model, shapes[0] if len(shapes) == 1 else shapes, solver=args.solver,
                             tol=args.tol, max_products=args.max_products, verbose=0)
    return est, "keras-layers", None, tuple(est.input_shape)


def _built_input_shape(model) -> tuple | None:
    """The input shape (batch axis first) a loaded subclassed model was built on, if recorded."""
    shape = (model.get_build_config() or {}).get("input_shape")
    if isinstance(shape, (list, tuple)) and shape and all(
            d is None or isinstance(d, int) for d in shape):
        return (None, *shape[1:])
    return None  # never built, or several inputs: --input-shape says it


def _graph_from_keras(model, shapes, args, fmt, progress):
    """A subclassed Keras model: analysed on the graph of its ``call``."""
    import tensorflow as tf

    from tf_lipschitz.errors import LipschitzError
    from tf_lipschitz.tfgraph import GraphEstimator

    if len(shapes) != 1:
        raise UsageError("subclassed models are analysed with one input only")
    progress(f"subclassed model '{model.name}': tracing and freezing its TensorFlow graph")
    dtype = getattr(model, "compute_dtype", None) or "float32"
    try:
        est = GraphEstimator(lambda x: model(x, training=False),
                             tf.TensorSpec((None, *shapes[0]), dtype), name=model.name,
                             solver=args.solver, tol=args.tol, max_products=args.max_products,
                             seed=args.seed, verbose=0 if args.quiet else 1)
    except LipschitzError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own call failed on this shape
        raise UsageError(
            f"subclassed model '{model.name}' fails on inputs of shape "
            f"{(None, *shapes[0])}: {first_line(exc)}; check --input-shape") from exc
    return est, "tf-graph", None, tuple(est.input_shape)


def _savedmodel_target(args, progress: _Progress):
    from tf_lipschitz import tfgraph

    progress(f"loading SavedModel {args.path}")
    try:
        fn, key, loaded = tfgraph.load_signature(args.path, args.signature)
    except KeyError as exc:
        raise UsageError(str(exc.args[0]) + (" (use --signature NAME)" if args.signature is None
                                             else "")) from exc
    except OSError as exc:
        raise UsageError(first_line(exc)) from exc
    flat = _flat_input_specs(fn)
    specs = [(getattr(spec, "name", None) or f"input_{i}",
              spec.shape.as_list() if spec.shape.rank is not None else None)
             for i, spec in enumerate(flat)]
    shapes = None
    if all(spec.dtype.is_floating for spec in flat):  # other dtypes: reported by the reader
        shapes = _input_shapes(args.input_shape, specs)
    progress(f"signature '{key}': inlining and freezing the graph, reading its ops")
    est = tfgraph.GraphEstimator(
        fn, input_shape=shapes[0] if shapes and len(shapes) == 1 else shapes,
        name=os.path.basename(os.path.normpath(args.path)), solver=args.solver, tol=args.tol,
        max_products=args.max_products, seed=args.seed, verbose=0 if args.quiet else 1,
        _signature_name=key, _owner=loaded,
    )
    return est, "tf-graph", key, tuple(est.input_shape)


def _flat_input_specs(fn) -> list:
    """``TensorSpec``s of the user-facing (non-captured) inputs of a concrete function."""
    import tensorflow as tf

    structured = fn.structured_input_signature
    if structured is None:
        return [tf.TensorSpec(t.shape, t.dtype, t.name.split(":")[0]) for t in fn.inputs]
    return tf.nest.flatten(structured)


def analyze(args, out: TextIO, err: TextIO) -> Analysis:
    """Runs ``tf-lipschitz analyze`` with parsed ``args``; returns the :class:`Analysis`.

    Raises:
        UsageError: Bad arguments or an unreadable path.
        tf_lipschitz.LipschitzError: The model cannot be bounded (unsupported or not Lipschitz).
    """
    start = time.perf_counter()
    progress = _Progress(err, not args.quiet)
    _check_writable(args.json_path, "--json")
    _check_writable(args.plot, "--plot")
    if args.plot and not {"autolip", "seqlip"} & set(args.methods):
        raise UsageError("--plot needs an upper-bound method: add autolip or seqlip to --methods")
    fmt = _format_of(args.path)
    if fmt == "savedmodel":
        est, kind, signature, input_shape = _savedmodel_target(args, progress)
    else:
        if args.signature is not None:
            print(f"note: --signature is ignored for {fmt} files", file=err)
        est, kind, signature, input_shape = _keras_target(args, fmt, progress)
    analysis = Analysis(path=args.path, format=fmt, analysis=kind, signature=signature,
                        input_shape=input_shape, methods=tuple(args.methods))
    lower_value = None
    for method in args.methods:
        if method == "autolip":
            n = len(est.engine.operators)
            progress(f"AutoLip: measuring {n} linear operator(s) with {args.solver} "
                     f"(tol={args.tol:g}) in one compiled solve")
            analysis.reports["autolip"] = est.autolip(certified=args.certified,
                                                      verbose=0 if args.quiet else 1)
        elif method == "seqlip":
            if kind != "keras-layers":
                analysis.skipped["seqlip"] = (
                    "SeqLip needs the Keras layer structure of a Sequential or Functional model; "
                    + ("a subclassed model is analysed on the TensorFlow graph of its call, "
                       "which supports AutoLip only" if fmt != "savedmodel" else
                       "a SavedModel graph supports AutoLip only (analyse the model's .keras "
                       "file for SeqLip)"))
            elif not hasattr(est, "seqlip"):
                analysis.skipped["seqlip"] = "SeqLip is not available in this tf_lipschitz version"
            else:
                progress("SeqLip: maximising over activation patterns")
                analysis.reports["seqlip"] = est.seqlip(certified=args.certified,
                                                        large_operators=args.seqlip_large,
                                                        verbose=0 if args.quiet else 1)
        elif method == "lower":
            from tf_lipschitz.errors import LowerBoundUnavailableError
            from tf_lipschitz.estimator import LipschitzEstimator

            inputs = len(est.graph.inputs)
            if inputs != 1 and not isinstance(est, LipschitzEstimator):
                analysis.skipped["lower"] = ("the lower bound of a graph supports one input; "
                                             f"this one has {inputs}")
                continue
            progress(f"lower bound: search from {args.lower_starts} random point(s), "
                     f"{args.lower_steps} refinement step(s)")
            try:
                analysis.lower = est.lower_bound(
                    n_random=args.lower_starts, steps=args.lower_steps, seed=args.seed,
                    verbose=0 if args.quiet else 1)
            except LowerBoundUnavailableError as exc:  # the upper bounds stand without it
                analysis.skipped["lower"] = str(exc)
                continue
            lower_value = analysis.lower.value
    for method, reason in analysis.skipped.items():
        print(f"note: {method} skipped: {reason}", file=err)
    if not analysis.reports and analysis.lower is None:
        raise UsageError("none of the requested methods can run on this model ("
                         + "; ".join(f"{m}: {r}" for m, r in analysis.skipped.items())
                         + "); choose others with --methods")
    if lower_value is not None:
        analysis.reports = {k: dataclasses.replace(r, lower=lower_value)
                            for k, r in analysis.reports.items()}
    analysis.elapsed = time.perf_counter() - start
    # With --json -, stdout carries the JSON document only; the text goes to stderr.
    text_out = err if args.json_path == "-" else out
    if not args.quiet:
        for rep in analysis.reports.values():
            print(rep.table(), file=text_out)
            print(file=text_out)
    if not (args.quiet and args.json_path == "-"):
        print(analysis.summary(), file=text_out)
    if args.json_path:
        text = json.dumps(analysis.to_dict(), indent=2, ensure_ascii=False)
        if args.json_path == "-":
            print(text, file=out)
        else:
            try:
                with open(args.json_path, "w", encoding="utf-8") as fh:
                    fh.write(text + "\n")
            except OSError as exc:
                raise UsageError(f"--json {args.json_path}: cannot write the file "
                                 f"({exc.strerror or exc})") from None
            progress(f"wrote {args.json_path}")
    if args.plot and analysis.reports:
        _plot(analysis, args.plot)
        progress(f"wrote {args.plot}")
    elif args.plot:
        print("note: --plot needs an upper-bound method (autolip or seqlip)", file=err)
    return analysis


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_tensorflow(debug: bool):
    """Silences TensorFlow's Python log messages while the command runs, unless ``--debug``.

    The Python loggers of TensorFlow and absl print errors only, and get their levels back on
    exit (``main()`` may run inside a process that goes on: a notebook, the tests). TensorFlow's
    C++ log is read from ``TF_CPP_MIN_LOG_LEVEL`` when the package imports TensorFlow, before
    the command runs: set it to 3 in the environment to hide most of those lines too (TF 2.21
    prints a few at import whatever the setting; docs/cli.md).
    """
    if debug:
        yield
        return
    from absl import logging as absl_logging  # absl ships with TensorFlow

    logger = logging.getLogger("tensorflow")
    previous = logger.level, absl_logging.get_verbosity()
    logger.setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous[0])
        absl_logging.set_verbosity(previous[1])


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Runs the command line; returns the exit code.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
        stdout: Stream for results (default: ``sys.stdout``).
        stderr: Stream for progress, notes and errors (default: ``sys.stderr``).

    Returns:
        0 success, 1 internal error, 2 bad arguments or unreadable path, 3 unsupported model.

    Example:
        >>> from tf_lipschitz.cli import main
        >>> main(["analyze", "does/not/exist.keras"])  # doctest: +SKIP
        2
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        if args.command is None:
            parser.print_help(out)
            return EXIT_USAGE
        with _quiet_tensorflow(debug):
            return _run(args, out, err)
    except UsageError as exc:
        _report(err, exc, debug)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=err)
        return 130


def _run(args, out: TextIO, err: TextIO) -> int:
    from tf_lipschitz.errors import LipschitzError

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if not args.quiet or issubclass(category, UserWarning):
            text = " ".join(str(message).split())
            print(f"warning: {text}", file=err)

    library_out = err if not args.quiet else io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        if not args.debug:
            warnings.showwarning = show_warning
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            with contextlib.redirect_stdout(library_out):
                analyze(args, out, err)
            return EXIT_OK
        except UsageError as exc:
            _report(err, exc, args.debug)
            return EXIT_USAGE
        except LipschitzError as exc:
            _report(err, exc, args.debug, prefix="unsupported model")
            return EXIT_UNSUPPORTED
        except Exception as exc:  # noqa: BLE001 - the CLI turns every failure into one line
            _report(err, exc, args.debug, prefix="internal error",
                    suffix="" if args.debug else " (rerun with --debug for the traceback)")
            return EXIT_INTERNAL


def _report(err: TextIO, exc: BaseException, debug: bool, prefix: str = "error",
            suffix: str = ""):
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=err)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if prefix == "internal error":
        text = f"{type(exc).__name__}: {text}"
    print(f"{prefix}: {text}{suffix}", file=err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
