"""Installs headstart: the `contracts`, `pipeline`, `features`, `heads` and `headstart` packages
and the `headstart` script.

    pip install -e '.[test]'          # developers (what run_tests.sh does)
    pip install '.[gcp]'              # adds Dataflow / gs:// support for Beam

This file is also the Beam `--setup_file` that Dataflow workers install, so it only declares
packages and pinned requirements (no build-time side effects).
"""
import setuptools

# Pinned to versions that install together on Python 3.11 (checked by `.ci/run`).
REQUIRED_PACKAGES = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    # The tfrecord extra brings crcmod/google-crc32c: without it WriteToTFRecord fails at the
    # first record ("Could not find python-snappy, google-crc32c, or crcmod").
    "apache-beam[tfrecord]==2.77.0",
    "google-crc32c==1.9.0",  # fast TFRecord CRCs in Beam (else a slow fallback)
    "tensorflow-datasets==4.9.10",
    "opencv-python-headless==5.0.0.93",
    "numpy==2.4.6",
    "protobuf==6.33.6",
    "pandas==3.1.1",
    "pillow==12.3.0",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
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
        "gcp": ["apache-beam[gcp,tfrecord]==2.77.0"],
        "test": ["pytest==9.2.0"],
    },
    entry_points={"console_scripts": ["headstart=headstart.cli:main"]},
)
