"""Installs headstart: the `contracts`, `pipeline`, `features`, `heads` and `headstart` packages
and the `headstart` script.

    pip install -c requirements/constraints.txt -e '.[test]'   # developers (what setup_env.sh does)
    pip install '.[gcp]'                                       # adds Dataflow / gs:// support for Beam

Requirements are compatible ranges, so headstart installs into an existing environment; the
exact set that was tested is `requirements/constraints.txt` (setup_env.sh, CI and the worker
containers install with it). Every package the code imports is declared here, and nothing else.
This file is also usable as Beam's `--setup_file` (no build-time side effects), though the
containers in `containers/` make that unnecessary.
"""
import setuptools

REQUIRED_PACKAGES = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.15,<3.16",
    # The tfrecord extra brings crcmod/google-crc32c: without it WriteToTFRecord fails at the
    # first record ("Could not find python-snappy, google-crc32c, or crcmod"). The minor version
    # is pinned: a Dataflow worker container must carry the very SDK version that launched it.
    "apache-beam[tfrecord]>=2.77,<2.78",
    "google-crc32c>=1.9,<2",  # TFRecord CRCs: Beam's fast path and pipeline/sharding.py
    "tensorflow-datasets>=4.9.10,<4.10",
    "opencv-python-headless>=5.0,<6",
    "numpy>=2.4,<3",
    "protobuf>=6.33,<7",
    "pillow>=12.3,<13",
    "matplotlib>=3.11,<4",
    "tqdm>=4.70,<5",  # progress bars of the command line (headstart/logs.py)
    "absl-py>=2.5,<3",  # headstart/logs.py quiets absl's start-up lines
    "psutil>=7.2,<8",  # heads/caching.py: the default cache budget from the memory available
    "pyarrow>=25,<26",  # heads/feature_export.py: Parquet (Beam needs it anyway)
]

setuptools.setup(
    name="headstart",
    version="0.1.0",
    description="Transfer learning at scale: cache frozen-backbone features once, compare many heads.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["contracts", "contracts.*", "pipeline", "pipeline.*",
                                               "features", "features.*", "heads", "heads.*",
                                               "headstart", "headstart.*"]),
    package_data={"features": ["weights/*.h5", "weights/*.md"]},
    install_requires=REQUIRED_PACKAGES,
    extras_require={
        "gcp": ["apache-beam[gcp,tfrecord]>=2.77,<2.78"],
        # pandas: the tests' and ../shared/checks' table reading; packaging:
        # tests/test_dependencies.py.
        "test": ["pytest>=9.2,<10", "pandas>=3.1,<4", "packaging>=26"],
    },
    entry_points={"console_scripts": ["headstart=headstart.cli:main"]},
)
