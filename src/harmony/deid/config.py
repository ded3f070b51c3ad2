"""The de-identifier built from an options table: the same keys for the middleware and the CLI.

Why here: ``[middleware.X.options]`` of a ``deidentify`` middleware and the file
given to ``harmony deidentify --options`` are one format, so a project tries its
settings on a folder of files before it puts them on the wire.
"""

from __future__ import annotations

from harmony.config.errors import OptionError
from harmony.config.options import Options
from harmony.deid.keys import Keyring, KeyError_, LookupTable, read_secret
from harmony.deid.pixels import (FORWARD, QUARANTINE, SUSPECT_MODALITIES, SUSPECT_SOP_CLASSES, MaskRule, PixelPolicy,
                                 PixelPolicyError)
from harmony.deid.profile import Deidentifier, Profile, ProfileError, ProfileOptions, parse_private_entry

#: Every key this module reads (the middleware adds its own few).
KEYS = ("secret_file", "date_shift_max_days", "lookup_table", "retain_longitudinal", "safe_private",
        "retain_safe_private", "retain_uids", "retain_device_identity", "retain_institution_identity",
        "retain_patient_characteristics", "clean_descriptors", "clean_structured_content", "clean_graphics",
        "pseudonymous_name", "pixels")


def profile_options(options: Options) -> ProfileOptions:
    longitudinal = options.str("retain_longitudinal", "no", choices=("no", "full", "modified"))
    safe = options.list("safe_private", [], of=str)
    try:
        entries = tuple(parse_private_entry(e) for e in safe)
        opts = ProfileOptions(
            retain_safe_private=bool(entries) or options.bool("retain_safe_private", False),
            retain_uids=options.bool("retain_uids", False),
            retain_device_identity=options.bool("retain_device_identity", False),
            retain_institution_identity=options.bool("retain_institution_identity", False),
            retain_patient_characteristics=options.bool("retain_patient_characteristics", False),
            retain_long_full_dates=longitudinal == "full",
            retain_long_modified_dates=longitudinal == "modified",
            clean_descriptors=options.bool("clean_descriptors", False),
            clean_structured_content=options.bool("clean_structured_content", False),
            clean_graphics=options.bool("clean_graphics", False),
            safe_private=entries,
            pseudonymous_name=options.bool("pseudonymous_name", True),
        )
        opts.check()
    except ProfileError as e:
        raise OptionError(e.key, e.message) from None
    return opts


def pixel_policy(raw: dict) -> PixelPolicy:
    if not isinstance(raw, dict):
        raise OptionError("pixels", "must be a table")
    opts = Options(raw)
    rules_raw = opts.list("mask_rules", [], of=dict)
    try:
        rules = tuple(MaskRule.from_dict(i, r) for i, r in enumerate(rules_raw))
    except PixelPolicyError as e:
        raise OptionError(f"pixels.{e.key}", e.message) from None
    policy = PixelPolicy(
        suspect=opts.str("suspect", QUARANTINE, choices=(QUARANTINE, FORWARD)),
        modalities=frozenset(m.upper() for m in opts.list("modalities", sorted(SUSPECT_MODALITIES), of=str)),
        sop_classes=frozenset(opts.list("sop_classes", sorted(SUSPECT_SOP_CLASSES), of=str)),
        trust_burned_in_no=opts.bool("trust_burned_in_no", False),
        rules=rules,
    )
    extra = sorted(set(opts.raw) - opts.used)
    if extra:
        raise OptionError("pixels", f"unknown option(s): {', '.join(extra)}")
    return policy


def build(options: Options) -> tuple[Deidentifier, PixelPolicy]:
    """The de-identifier and pixel policy an options table describes (OptionError names the key)."""
    secret_path = options.path("secret_file")
    try:
        keyring = Keyring(read_secret(secret_path),
                          date_shift_max_days=options.int("date_shift_max_days", 3650, minimum=1, maximum=36500))
    except KeyError_ as e:
        raise OptionError("secret_file", str(e)) from None
    lookup = None
    if "lookup_table" in options:
        try:
            lookup = LookupTable.load(options.path("lookup_table"))
        except ValueError as e:
            raise OptionError("lookup_table", str(e)) from None
    deid = Deidentifier(Profile(profile_options(options)), keyring, lookup)
    return deid, pixel_policy(options.table("pixels", {}))
