"""Options several commands share: a config with `--set`, a Ray address, and where storage is."""

from __future__ import annotations

import argparse

from pipeline.storage import StorageOptions


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set epochs=5 (repeatable)")


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def add_storage_args(p: argparse.ArgumentParser) -> None:
    """For commands that take a URI instead of a config (a config says this in its `storage:`)."""
    p.add_argument("--endpoint-url", default=None, metavar="URL",
                   help="S3-compatible endpoint, e.g. http://minio:9000 (default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)")
    p.add_argument("--region", default=None, help="S3 region (default: the AWS chain: $AWS_REGION, the profile)")


def storage_options(args: argparse.Namespace, uri: str, what: str) -> StorageOptions:
    """The storage flags as options, once the location is checked to answer: one line if it cannot be used."""
    from pipeline import storage

    options = StorageOptions(endpoint_url=args.endpoint_url, region=args.region)
    storage.check_reachable(uri, what, options)
    return options
