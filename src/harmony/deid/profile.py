"""The PS3.15 Annex E profile compiled for one set of options, applied to pydicom Datasets.

Why compile: the standard's table (:mod:`harmony.deid.table`) gives every
attribute a basic action and per-option overrides; resolving those once per
configuration leaves one dict lookup per element when instances flow, which
is what makes de-identification cheap enough to sit on a forwarding path.

How actions are resolved (documented in docs/middleware/deidentify.md):

- a selected option that names the attribute wins over the basic action, and
  when several selected options name it, ``K`` (keep) wins over ``C`` (clean);
- combined basic actions take the variant that keeps the element present, since
  Harmony does not know the IOD's Type for every SOP class: ``X/Z`` -> ``Z``,
  ``X/D``, ``Z/D`` and ``X/Z/D`` -> ``D``, ``X/Z/U*`` -> ``U`` (the sequence stays,
  its UIDs are replaced).  Empty or dummy values are never identifying, and the
  result is valid for Type 1, 2 and 3 alike;
- ``D`` on a UI element is a keyed replacement UID (like ``U``); on a sequence it
  keeps the items and de-identifies them with the same table; ``C`` depends on the
  option that asked for it: dates are shifted (Modified Dates), AE titles and device
  names become keyed pseudonyms (Device Identity), free text has every identifying
  value of the instance cut out (Descriptors, Structured Content, Patient
  Characteristics, Graphics); binary values that cannot be cleaned are removed.
- attributes not in the table are kept; sequences not in the table are still
  walked, so a UID inside a functional group is replaced like a top-level one.
"""

from __future__ import annotations

import datetime
import re
import uuid

import attr
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from harmony.deid import table
from harmony.deid.keys import Keyring, LookupTable

#: PS3.16 CID 7050 De-identification Method codes, per option.
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES = {
    "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_long_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_long_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}
#: DeidentificationMethod (LO, 64 characters a value): one short value per part.
METHOD_TEXT = "PS3.15 E.1 Basic Profile (Harmony, table " + table.REVISION + ")"

# Resolved actions.
REMOVE, EMPTY, DUMMY, KEEP, UID = "X", "Z", "D", "K", "U"
SHIFT, DEVICE, TEXT, PRIVATE = "shift", "device", "text", "private"  # the kinds of C (clean)
_COMBINED = {"X/Z": EMPTY, "X/D": DUMMY, "Z/D": DUMMY, "X/Z/D": DUMMY, "X/Z/U*": UID}
_CLEAN_BY_OPTION = {
    "retain_long_modified_dates": SHIFT,
    "retain_device_identity": DEVICE,
    "clean_descriptors": TEXT,
    "clean_structured_content": TEXT,
    "retain_patient_characteristics": TEXT,
    "clean_graphics": TEXT,
    "retain_safe_private": PRIVATE,
}
_TEXT_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN", "OB or OW", "US or OW"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT", "US or SS", "US or SS or OW"})
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0", "DS": "0",
          "PN": "ANONYMIZED", "UR": "urn:anonymized"}
PATIENT_ID, PATIENT_NAME = 0x00100020, 0x00100010
SOP_INSTANCE_UID, SERIES_UID, STUDY_UID = 0x00080018, 0x0020000E, 0x0020000D
#: File meta attributes that name systems (removed) beyond Media Storage SOP Instance UID (in the table).
FILE_META_REMOVE = (0x00020016, 0x00020017, 0x00020018, 0x00020026, 0x00020027, 0x00020028, 0x00020100, 0x00020102)
#: Harmony's own, a 2.25 UUID-derived UID (needs no registered root): uuid5(URL, "urn:harmony-proxy:deidentify").
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:harmony-proxy:deidentify").int)
IMPLEMENTATION_VERSION = "HARMONY_DEID"


class ProfileError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@attr.s(frozen=True, auto_attribs=True)
class ProfileOptions:
    """The PS3.15 E.3 options by name, plus what they need."""

    retain_safe_private: bool = False
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    retain_long_full_dates: bool = False
    retain_long_modified_dates: bool = False
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    clean_graphics: bool = False
    #: Retain Safe Private: the allow-list as (group, private creator, element low byte).
    safe_private: tuple = ()
    #: PatientName becomes the Patient ID pseudonym (Z allows a dummy) rather than empty.
    pseudonymous_name: bool = True

    def selected(self) -> list[str]:
        return [name for name in table.OPTIONS if getattr(self, name)]

    def check(self) -> None:
        if self.retain_long_full_dates and self.retain_long_modified_dates:
            raise ProfileError("retain_longitudinal", "full dates and modified dates exclude each other")
        if self.retain_safe_private and not self.safe_private:
            raise ProfileError("safe_private", "Retain Safe Private needs an allow-list of private attributes")


def parse_private_entry(text: str) -> tuple[int, str, int]:
    """``"0029,SIEMENS CSA HEADER,10"`` -> (0x0029, "SIEMENS CSA HEADER", 0x10)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 3:
            raise ValueError
        group, creator, element = int(parts[0], 16), parts[1], int(parts[2].lower().removeprefix("xx"), 16)
        if not group & 1 or not creator or not 0 <= element <= 0xFF:
            raise ValueError
    except ValueError:
        raise ProfileError("safe_private", f"{text!r}: expected 'GGGG,PRIVATE CREATOR,EE' with an odd group") from None
    return group, creator, element


def resolve(basic: str, option_actions: dict, selected: set) -> str:
    chosen = [(opt, act) for opt, act in option_actions.items() if opt in selected]
    if any(act == "K" for _, act in chosen):
        return KEEP
    for opt, act in chosen:
        if act == "C":
            return _CLEAN_BY_OPTION[opt]
    return _COMBINED.get(basic, basic)


class Profile:
    """Options compiled into one action per tag."""

    def __init__(self, options: ProfileOptions):
        options.check()
        self.options = options
        selected = set(options.selected())
        self.actions: dict[int, str] = {}
        self.names: dict[int, str] = {}
        for tag, name, basic, opts in table.ATTRIBUTES:
            self.actions[tag] = resolve(basic, opts, selected)
            self.names[tag] = name
        self.masked = [(hi, el, resolve(basic, opts, selected)) for hi, el, _, basic, opts in table.MASKED]
        self.private_action = resolve(table.PRIVATE[1], table.PRIVATE[2], selected)
        self.safe_private = frozenset(options.safe_private) if self.private_action == PRIVATE else frozenset()
        self.text_cleaning = TEXT in self.actions.values() or any(a == TEXT for _, _, a in self.masked)
        self.shift_dates = options.retain_long_modified_dates
        #: Attributes whose text values identify (removed or replaced, of a text VR): cut out of free text.
        self.identity_tags = frozenset(t for t, a in self.actions.items() if a not in (KEEP, UID)
                                       and _dictionary_vr(t) in ("PN", "LO", "SH", "DA", "LT", "ST", "UT", "UC"))
        codes = [BASIC_CODE] + [OPTION_CODES[o] for o in options.selected()]
        self.codes = codes

    def masked_action(self, tag: int) -> str | None:
        group = tag >> 16
        hi = group >> 8
        if hi not in (0x50, 0x60) or group & 1:
            return None
        for mhi, el, action in self.masked:
            if mhi == hi and (el is None or el == tag & 0xFFFF):
                return action
        return None


@attr.s(auto_attribs=True)
class Change:
    """One thing an action did (for the dry-run report; values never included)."""

    path: str
    tag: int
    name: str
    action: str


class Deidentifier:
    """Applies a :class:`Profile` with a :class:`Keyring` (and optional lookup table) to datasets.

    Thread-safe for concurrent use except for the UID cache, whose races are harmless
    (the same key always gives the same UID).  ``on_uid(original, new)`` is called
    for every replaced UID and Patient ID, for reverse lookups by a serving proxy.
    """

    def __init__(self, profile: Profile, keyring: Keyring, lookup: LookupTable | None = None, on_uid=None):
        self.profile = profile
        self.keys = keyring
        self.lookup = lookup
        self.on_uid = on_uid

    # ------------------------------------------------------------------ entry points

    def already_done(self, ds: Dataset) -> bool:
        """True when *ds* was de-identified with this secret already: its Patient ID or a UID is
        one of our pseudonyms.  Such data (an archive of de-identified instances answering
        through the middleware, a second CLI run) passes unchanged rather than hashed twice."""
        pid = ds.get(PATIENT_ID)
        if pid is not None and pid.value:
            value = str(pid.value)
            if self.keys.is_ours_patient(value) or (self.lookup is not None and self.lookup.is_pseudonym(value)):
                return True
        for t in (SOP_INSTANCE_UID, SERIES_UID, STUDY_UID):
            elem = ds.get(t)
            if elem is not None and elem.value and self.keys.is_ours_uid(str(elem.value)):
                return True
        return False

    def dataset(self, ds: Dataset, report: list | None = None) -> Dataset:
        """De-identify *ds* in place (file meta included when present) and return it."""
        if self.already_done(ds):
            return ds
        ctx = _Context(self, ds, report)
        self._walk(ds, ctx, "")
        meta = getattr(ds, "file_meta", None)
        if meta is not None and len(meta):
            self._file_meta(ds, meta, ctx)
        self._mark(ds)
        return ds

    def identifier(self, ds: Dataset) -> Dataset:
        """De-identify a C-FIND answer: the same replacements, without the method attributes
        a query answer did not ask for."""
        if self.already_done(ds):
            return ds
        ctx = _Context(self, ds, None)
        self._walk(ds, ctx, "")
        return ds

    def uid(self, original: str) -> str:
        new = self.keys.uid(original)
        if self.on_uid is not None:
            self.on_uid(original, new)
        return new

    # ------------------------------------------------------------------ internals

    def _walk(self, ds: Dataset, ctx: "_Context", path: str) -> None:
        actions = self.profile.actions
        private_tags = None
        for tag in list(ds.keys()):
            t = int(tag)
            if (t >> 16) & 1:
                if private_tags is None:
                    private_tags = []
                private_tags.append(t)
                continue
            action = actions.get(t)
            if action is None:
                action = self.profile.masked_action(t)
                if action is None:
                    if t & 0xFFFF == 0 and t >> 16 > 0x0002:
                        continue  # group lengths: pydicom recomputes nothing; harmless to keep
                    if _vr_of(ds, t) == "SQ":
                        for i, item in enumerate(ds[t].value):
                            self._walk(item, ctx, f"{path}{_tagname(t)}[{i}].")
                    continue
            self._apply(ds, t, action, ctx, path)
        if private_tags:
            self._private(ds, private_tags, ctx, path)

    def _apply(self, ds: Dataset, t: int, action: str, ctx, path: str) -> None:
        if action == REMOVE:
            del ds[t]
            ctx.note(path, t, REMOVE)
            return
        vr = _vr_of(ds, t)
        if vr == "SQ":
            if action == EMPTY:
                ds[t].value = Sequence()
            else:  # keep/clean/dummy/UID on a sequence: keep the items, de-identify inside them
                for i, item in enumerate(ds[t].value):
                    self._walk(item, ctx, f"{path}{_tagname(t)}[{i}].")
            ctx.note(path, t, action)
            return
        if action == KEEP:
            return
        elem = ds[t]
        if t == PATIENT_ID and action in (DUMMY, EMPTY):
            elem.value = ctx.pseudonym()
        elif t == PATIENT_NAME and action in (DUMMY, EMPTY) and self.profile.options.pseudonymous_name:
            elem.value = ctx.pseudonym_name()
        elif vr == "UI" and action in (UID, DUMMY):
            elem.value = _map_values(elem.value, self.uid)
        elif action == EMPTY:
            elem.value = _empty(vr)
        elif action == DUMMY:
            elem.value = _dummy(vr)
        elif action == SHIFT:
            if vr in ("DA", "DT"):
                shifted = _map_values(elem.value, lambda v: _shift(v, vr, ctx.shift()))
                if shifted is None or (isinstance(shifted, list) and None in shifted):
                    del ds[t]  # a date that cannot be shifted reliably does not leave
                    ctx.note(path, t, REMOVE)
                    return
                elem.value = shifted
            elif vr in _BINARY_VRS:  # a binary timestamp (Frame Origin Timestamp) cannot be shifted here
                del ds[t]
                ctx.note(path, t, REMOVE)
                return
            # TM, a time zone offset: whole-day shifts leave them as they were
        elif action == DEVICE:
            if vr in _TEXT_VRS:
                width = 16 if vr in ("AE", "SH", "CS") else 24
                elem.value = _map_values(elem.value, lambda v: ("DEV" + self.keys.token("device", v, 13))[:width])
            else:
                elem.value = _dummy(vr)
        elif action == TEXT:
            if vr in _TEXT_VRS:
                elem.value = _map_values(elem.value, ctx.clean_text)
            elif vr in _BINARY_VRS:
                del ds[t]  # binary content (overlay bitmaps, curves) cannot be cleaned here
                ctx.note(path, t, REMOVE)
                return
        elif action == UID:  # U on a non-UI element (malformed VR): replace the text
            elem.value = _map_values(elem.value, lambda v: self.uid(str(v)))
        ctx.note(path, t, action)

    def _private(self, ds: Dataset, tags: list[int], ctx, path: str) -> None:
        keep: set[int] = set()
        allowed = self.profile.safe_private
        if allowed:
            for t in tags:
                group, element = t >> 16, t & 0xFFFF
                if element >= 0x1000:
                    creator_tag = (group << 16) | (element >> 8)
                    creator = ds.get(creator_tag)
                    name = str(creator.value).strip() if creator is not None else ""
                    if (group, name, element & 0xFF) in allowed:
                        keep.update((t, creator_tag))
        for t in tags:
            if t not in keep:
                del ds[t]
                ctx.note(path, t, REMOVE)

    def _file_meta(self, ds: Dataset, meta: Dataset, ctx) -> None:
        if self.profile.actions.get(0x00020003) != KEEP:
            sop = ds.get(SOP_INSTANCE_UID)
            meta.MediaStorageSOPInstanceUID = sop.value if sop is not None else self.uid(
                str(meta.get("MediaStorageSOPInstanceUID", "")))
            ctx.note("meta.", 0x00020003, UID)
        for t in FILE_META_REMOVE:
            if t in meta:
                del meta[t]
                ctx.note("meta.", t, REMOVE)
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION

    def _mark(self, ds: Dataset) -> None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [METHOD_TEXT] + [OPTION_CODES[o][1][:64] for o in self.profile.options.selected()]
        items = []
        for value, meaning in self.profile.codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        opts = self.profile.options
        ds.LongitudinalTemporalInformationModified = (
            "UNMODIFIED" if opts.retain_long_full_dates else "MODIFIED" if opts.retain_long_modified_dates
            else "REMOVED")

    def add_code(self, ds: Dataset, option: str) -> None:
        """Record a further method (e.g. Clean Pixel Data after masking)."""
        value, meaning = OPTION_CODES[option]
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        ds.DeidentificationMethodCodeSequence.append(item)
        method = ds["DeidentificationMethod"]
        methods = list(method.value) if method.VM > 1 else [method.value]
        ds.DeidentificationMethod = methods + [meaning]


class _Context:
    """Per-instance state: the patient key (for pseudonyms and the date shift), the
    identifying values to cut out of free text, and the report."""

    def __init__(self, deid: Deidentifier, ds: Dataset, report):
        self.deid = deid
        self.report = report
        # Keyed on the Patient ID alone, not qualified by its issuer: a C-FIND answer rarely carries
        # the issuer, and its pseudonym must equal the one the instances get.
        pid = ds.get(PATIENT_ID)
        self.patient_id = str(pid.value).strip() if pid is not None and pid.value else ""
        key = self.patient_id
        if not key:
            name = ds.get(PATIENT_NAME)
            study = ds.get(STUDY_UID)
            key = "name:" + str(name.value) if name is not None and name.value else \
                "study:" + (str(study.value) if study is not None else "")
        self.patient_key = key
        self._shift: datetime.timedelta | None = None
        self._looked_up = None
        self._redact = _redactor(ds, deid.profile) if deid.profile.text_cleaning else None

    def note(self, path, tag, action):
        if self.report is not None:
            self.report.append(Change(path, tag, self.deid.profile.names.get(tag, _keyword(tag)), action))

    def _lookup(self):
        if self._looked_up is None:
            found = self.deid.lookup.get(self.patient_id) if self.deid.lookup is not None else None
            self._looked_up = found or (self.deid.keys.patient_pseudonym(self.patient_key), None)
            if self.patient_id and self.deid.on_uid is not None:
                self.deid.on_uid(self.patient_id, self._looked_up[0])
        return self._looked_up

    def pseudonym(self) -> str:
        return self._lookup()[0]

    def pseudonym_name(self) -> str:
        pseudo, name = self._lookup()
        return name or pseudo

    def shift(self) -> datetime.timedelta:
        if self._shift is None:
            self._shift = self.deid.keys.date_shift(self.patient_key)
        return self._shift

    def clean_text(self, value):
        if self._redact is None or not value:
            return value
        return self._redact.sub("***", str(value))


def _redactor(ds: Dataset, profile: Profile):
    """One regular expression matching every identifying value of the instance (the
    text values of attributes the profile removes or replaces), longest first."""
    words: set[str] = set()
    _collect_words(ds, profile.identity_tags, words)
    if not words:
        return None
    return re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)), re.IGNORECASE)


def _collect_words(ds: Dataset, identity_tags: frozenset, words: set) -> None:
    for key in ds.keys():
        t = int(key)
        if t in identity_tags:
            elem = ds[t]
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                text = str(v or "").strip()
                parts = [text] + (re.split(r"[\^=]", text) if elem.VR == "PN" else [])
                words.update(p.strip() for p in parts if len(p.strip()) >= 3)
        elif not (t >> 16) & 1 and _vr_of(ds, t) == "SQ":
            for item in ds[t].value:
                _collect_words(item, identity_tags, words)


def _map_values(value, fn):
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [fn(v) for v in value]
    if value is None or value == "":
        return value
    return fn(value)


def _shift(value, vr: str, delta: datetime.timedelta):
    text = str(value).strip()
    if not text:
        return text
    try:
        day = datetime.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None
    if len(text) < 8:
        return None
    return (day + delta).strftime("%Y%m%d") + text[8:]


def _empty(vr: str):
    if vr in _BINARY_VRS:
        return b""
    if vr in _NUMBER_VRS:
        return None
    return ""


def _dummy(vr: str):
    if vr in _DUMMY:
        return _DUMMY[vr]
    if vr in _BINARY_VRS:
        return b"\x00\x00"
    if vr in _NUMBER_VRS:
        return 0
    if vr in ("SH", "CS", "AE"):
        return _DUMMY_TEXT[:16]
    return _DUMMY_TEXT


_VR_CACHE: dict[int, str] = {}


def _vr_of(ds: Dataset, t: int) -> str:
    raw = ds.get_item(t)
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    return _dictionary_vr(t)


def _dictionary_vr(t: int) -> str:
    vr = _VR_CACHE.get(t)
    if vr is None:
        try:
            vr = dictionary_VR(t)
        except KeyError:
            vr = "UN"
        _VR_CACHE[t] = vr
    return vr


def _keyword(t: int) -> str:
    return f"({t >> 16:04X},{t & 0xFFFF:04X})"


def _tagname(t: int) -> str:
    return _keyword(t)


def empty_element(tag: int, vr: str) -> DataElement:
    return DataElement(tag, vr, _empty(vr))
