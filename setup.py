"""gradaccum: exact gradient accumulation for TensorFlow 1.x and 2.x.

TensorFlow is deliberately not in install_requires: it comes as tensorflow,
tensorflow-cpu, tensorflow-macos, tf-nightly, ... and pip cannot tell that one
satisfies another, so requiring one would install a second TensorFlow next
to the user's. Pick one with an extra, or bring your own.
"""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    namespace = {}
    with open(os.path.join(HERE, "gradaccum", "_version.py")) as handle:
        exec(handle.read(), namespace)
    return namespace["__version__"]


def read_readme():
    with open(os.path.join(HERE, "README.md")) as handle:
        return handle.read()


setup(
    name="gradaccum",
    version=read_version(),
    description="Exact gradient accumulation for TensorFlow: micro-batches of b, "
                "updates every n, the weights of batches of n*b.",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # GradientAccumulator: the import path of the library gradaccum grew from,
    # kept as deprecated aliases (see legacy/).
    packages=["gradaccum", "GradientAccumulator"],
    package_dir={"GradientAccumulator": "legacy/GradientAccumulator"},
    python_requires=">=3.7",
    install_requires=["packaging"],
    extras_require={
        "tensorflow": ["tensorflow>=2.2"],
        "tensorflow-cpu": ["tensorflow-cpu>=2.2"],
        # Keras 2 on TensorFlow >= 2.16 (use with TF_USE_LEGACY_KERAS=1).
        "tf-keras": ["tf-keras"],
        "test": ["pytest"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: Apache Software License",
    ],
)
