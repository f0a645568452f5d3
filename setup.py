"""Build script: the pure-Python package, the shipped models as package data,
the training subpackage (installed as cordseg.training) and the Cython OptiC kernel."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "cordseg._optic",
        ["cordseg/_optic.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    name="cordseg",
    version="0.1.0",
    description="Spinal cord and MS lesion segmentation in MRI on a CPU, in seconds (Gros et al. 2019 method, ONNX runtime).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["cordseg", "cordseg.models", "cordseg.training"],
    package_dir={"cordseg": "cordseg", "cordseg.models": "models", "cordseg.training": "training"},
    package_data={"cordseg.models": ["*.onnx", "*.md"]},
    ext_modules=cythonize(extensions, language_level=3),
    install_requires=["numpy>=1.22", "scipy>=1.8", "nibabel>=4.0", "onnxruntime>=1.16", "click>=8.0"],
    extras_require={
        "train": ["tensorflow-cpu>=2.16", "keras>=3.0", "tf2onnx>=1.16", "onnx>=1.15"],
        "test": ["pytest>=7", "onnx>=1.15"],
    },
    entry_points={"console_scripts": ["cordseg=cordseg.cli:main"]},
    zip_safe=False,
)
