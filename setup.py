"""Packaging for tf_lipschitz."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
EXAMPLES = ["matplotlib", "mlxtend", "scikit-learn"]

setup(
    name="tf_lipschitz",
    version="0.1.0",
    description=(
        "Measure and control the Lipschitz constant of Keras 3 / TensorFlow models: AutoLip, "
        "SeqLip, lower bounds, callbacks and constraints."
    ),
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["tf_lipschitz", "tf_lipschitz.*"]),
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3",
        "numpy",
        "absl-py",
        "tensorflow-probability",
        "tf-keras",
        "tensorboard",
    ],
    extras_require={
        # what the examples and plots need (data that ships inside packages: no download)
        "examples": EXAMPLES,
        "dev": EXAMPLES + ["pytest", "scipy", "mkdocs", "mkdocs-material", "mkdocstrings[python]"],
    },
    entry_points={"console_scripts": ["tf-lipschitz=tf_lipschitz.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
