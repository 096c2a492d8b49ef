"""Installable MaX-DeepLab for TensorFlow 2 (tf_keras / model garden stack)."""
from setuptools import Extension, find_packages, setup

setup(
    name="max-deeplab",
    version="0.1.0",
    description="MaX-DeepLab: end-to-end panoptic segmentation with mask transformers (TF2)",
    # The gin configs stay at the repo root (configs/, what users and the docs name) and are
    # installed as max_deeplab/configs, where max_deeplab.gin_config looks first.
    packages=[*find_packages(include=["max_deeplab", "max_deeplab.*"]), "max_deeplab.configs"],
    package_dir={"max_deeplab.configs": "configs"},
    package_data={"max_deeplab.configs": ["*.gin", "**/*.gin"]},
    # The `pq` verb's pixel loop (plain C, no numpy). Optional: without a compiler the
    # install still succeeds and `pq` takes its numpy path (same numbers, ~3x slower).
    ext_modules=[Extension("max_deeplab.evaluation._png_overlap",
                           ["max_deeplab/evaluation/_png_overlap.c"], optional=True)],
    python_requires=">=3.10",
    install_requires=[
        "tensorflow~=2.20.0",
        "tf-keras~=2.20.0",
        "tf-models-official~=2.20.0",
        "tensorflow-datasets",
        "gin-config",
        "absl-py",
        "scipy",
        # numpy 2 is what a plain `pip install` resolves with this stack and what the tests
        # run on; the COCO reference evaluator, which pins numpy<2, lives in its own
        # environment (scripts/ensure_reference_venv.sh).
        "numpy>=2",
        "pillow",
        "pyspng>=0.1.4",
        "kornia-rs>=0.2,<0.3",
        "deflate>=0.9",  # libdeflate: inflates the `pq` verb's PNGs
        "pycocotools",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "ruff"],
    },
    entry_points={"console_scripts": ["max-deeplab=max_deeplab.__main__:console_main"]},
)
