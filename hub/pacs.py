"""Import from a PACS: find studies on a DICOM node, download them resumably, then ingest.

A source is either a DICOMweb service (``http(s)://host[:port]/prefix``: QIDO-RS to find,
WADO-RS to retrieve) or a classic DICOM node (``AET@host:port``: C-FIND to find, C-GET, or
C-MOVE to an AE this process opens, to retrieve). The studies are chosen by accession
numbers, study instance UIDs and/or a query of study-level matching keys; a whole PACS is
never imported by default.

Instances are downloaded into a private download folder outside ``MEDZONE_HOME`` (they are
still identifying: the zone keeps only de-identified copies). Each instance is written
under a temporary name, read back and checked (its SOP instance UID is the one asked for),
flushed, and only then renamed into place, so a file at its final name is complete; a
partial one never counts. Run again with the same arguments after a kill or a dropped
connection, the import skips what is already there. When every instance is there, the
folder goes through :func:`~medzone_hub.ingest.ingest_dataset` like any source folder
(de-identify, verify, publish all-or-nothing), and is removed once the dataset is published.

Credentials come from a file or the environment, never from arguments; they are used for
the HTTP requests only and appear in no message, row or file that MedZone writes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from . import staging
from .config import MedZoneHome
from .errors import Conflict, InvalidInput, MedZoneError
from .ingest import IngestReport, ingest_dataset
from .registry import dataset_exists, validate_dataset_id

ENV_CREDENTIALS = "MEDZONE_PACS_CREDENTIALS"
ENV_USERNAME = "MEDZONE_PACS_USERNAME"
ENV_PASSWORD = "MEDZONE_PACS_PASSWORD"
ENV_DOWNLOAD_DIR = "MEDZONE_PACS_DOWNLOAD_DIR"
ENV_CALLING_AET = "MEDZONE_PACS_CALLING_AET"
#: The AE title MedZone calls a DICOM node from (and receives C-MOVEs at).
DEFAULT_CALLING_AET = "MEDZONE"
#: Seconds a PACS may stay silent before a request fails.
TIMEOUT_S = 30
#: Instances asked for in one C-GET/C-MOVE (a series at most).
BATCH = 256
#: Results asked for in one QIDO-RS search.
PAGE = 1000
#: Times a DIMSE request whose answer comes back short is asked again.
ATTEMPTS = 3

_AE_SOURCE = re.compile(r"^(?P<aet>[^@\\]{1,16})@(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PacsError(MedZoneError):
    """The PACS could not be reached, refused us, matched nothing, or a download stopped."""


# --- credentials -----------------------------------------------------------------------

@dataclass(frozen=True)
class PacsCredentials:
    username: str
    password: str = field(repr=False)

    def scrub(self, text: str) -> str:
        """*text* with the password (if it slipped in) replaced by ``***``."""
        return text.replace(self.password, "***") if self.password else text


def read_pacs_credentials(home: MedZoneHome, path: str | os.PathLike | None = None
                          ) -> PacsCredentials | None:
    """The PACS login: from *path* (``--pacs-credentials``) or ``$MEDZONE_PACS_CREDENTIALS``,
    a JSON file ``{"username": …, "password": …}``; else ``$MEDZONE_PACS_USERNAME`` and
    ``$MEDZONE_PACS_PASSWORD``; else None (no login)."""
    raw = path or os.environ.get(ENV_CREDENTIALS)
    if raw:
        file = Path(raw).expanduser().resolve()
        if file.is_relative_to(home.root):
            raise InvalidInput(f"{file}: the PACS credentials must be kept outside MEDZONE_HOME")
        try:
            data = json.loads(file.read_text())
        except OSError as err:
            raise InvalidInput(f"{file}: cannot read the PACS credentials ({err.strerror})") from None
        except ValueError:
            raise InvalidInput(f"{file}: the PACS credentials file is not JSON "
                               '({"username": …, "password": …})') from None
        if not isinstance(data, dict) or not isinstance(data.get("username"), str) \
                or not isinstance(data.get("password"), str):
            raise InvalidInput(f"{file}: the PACS credentials file needs string fields "
                               '"username" and "password"')
        return PacsCredentials(data["username"], data["password"])
    user, password = os.environ.get(ENV_USERNAME), os.environ.get(ENV_PASSWORD)
    if user or password:
        if not (user and password):
            raise InvalidInput(f"set both {ENV_USERNAME} and {ENV_PASSWORD}, or neither")
        return PacsCredentials(user, password)
    return None


# --- where to import from --------------------------------------------------------------

@dataclass(frozen=True)
class PacsNode:
    """A DICOMweb service (``url``) or a DICOM node (``aet``, ``host``, ``port``)."""

    kind: str  # "dicomweb" | "dimse"
    url: str = ""
    aet: str = ""
    host: str = ""
    port: int = 0

    @property
    def label(self) -> str:
        return self.url if self.kind == "dicomweb" else f"{self.aet}@{self.host}:{self.port}"


def parse_pacs_source(text: str) -> PacsNode:
    """``http(s)://host[:port]/prefix`` (DICOMweb) or ``AET@host:port`` (DIMSE)."""
    text = (text or "").strip()
    if text.lower().startswith(("http://", "https://")):
        parts = urlsplit(text)
        if parts.username is not None or parts.password is not None:
            raise InvalidInput("the PACS URL must not hold credentials: give them with "
                               f"--pacs-credentials FILE or {ENV_USERNAME}/{ENV_PASSWORD}")
        if parts.query or parts.fragment or not parts.hostname:
            raise InvalidInput("a DICOMweb source is http(s)://host[:port]/prefix, with no query")
        return PacsNode("dicomweb", url=text.rstrip("/"))
    match = _AE_SOURCE.match(text)
    if not match or not 0 < int(match["port"]) < 65536 or not match["aet"].strip():
        raise InvalidInput("--from-pacs takes a DICOMweb URL (http(s)://host:port/dicom-web) "
                           "or a DICOM node AET@host:port")
    return PacsNode("dimse", aet=match["aet"].strip(), host=match["host"].strip("[]"),
                    port=int(match["port"]))


def parse_move_destination(text: str | int | None) -> tuple[str, int] | None:
    """``--pacs-move-to``: ``PORT`` (all interfaces) or ``HOST:PORT`` where C-MOVE delivers."""
    if text is None or text == "":
        return None
    host, _, port = str(text).rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput("--pacs-move-to takes PORT or HOST:PORT")
    return (host.strip("[]") or "0.0.0.0", int(port))


@dataclass(frozen=True)
class Selection:
    """What to import: studies with any of these accession numbers or UIDs, or matching
    every key of ``query`` (DICOM keywords of study-level attributes)."""

    accessions: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    query: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, accessions=(), study_uids=(), query=None) -> "Selection":
        from pydicom.datadict import tag_for_keyword

        accessions = tuple(sorted({a.strip() for a in accessions or () if a.strip()}))
        study_uids = tuple(sorted({u.strip() for u in study_uids or () if u.strip()}))
        items = dict(query or {})
        for key in items:
            if tag_for_keyword(key) is None:
                raise InvalidInput(f"--pacs-query: {key!r} is not a DICOM keyword "
                                   "(e.g. StudyDate, ModalitiesInStudy, PatientID)")
        if not (accessions or study_uids or items):
            raise InvalidInput("say which studies to import: --accession, --study-uid or "
                               "--pacs-query KEY=VALUE")
        return cls(accessions, study_uids, tuple(sorted((k, str(v)) for k, v in items.items())))

    def filters(self) -> list[dict[str, str]]:
        """One study-level search per accession number and per UID, plus the query."""
        out = [{"AccessionNumber": a} for a in self.accessions]
        out += [{"StudyInstanceUID": u} for u in self.study_uids]
        if self.query:
            out.append(dict(self.query))
        return out


# --- the plan: every instance and the file it goes to ----------------------------------

@dataclass
class Instance:
    study: str
    series: str
    sop: str
    sop_class: str = ""
    patient_id: str = ""
    study_date: str = ""
    modality: str = ""
    series_number: str = ""
    instance_number: str = ""
    rel: str = ""  # its path in the download folder

    @classmethod
    def listed(cls, study_uid: str, study, ds, *, series) -> "Instance":
        """An instance as a search listed it: *ds* the instance's answer, *series* the
        answer that carries its series' attributes (the same one over DICOMweb)."""
        return cls(study=study_uid, series=str(series.get("SeriesInstanceUID", "")),
                   sop=str(ds.get("SOPInstanceUID", "")),
                   sop_class=str(ds.get("SOPClassUID", "")),
                   patient_id=str(study.get("PatientID", "")),
                   study_date=str(study.get("StudyDate", "")),
                   modality=str(series.get("Modality", "")),
                   series_number=str(series.get("SeriesNumber", "")),
                   instance_number=str(ds.get("InstanceNumber", "")))


def _number(text: str) -> tuple[int, str]:
    try:
        return (int(float(text)), text)
    except (TypeError, ValueError):
        return (1 << 30, text or "")


def assign_paths(instances: list[Instance]) -> list[Instance]:
    """``<PatientID>/<Modality>[-n]/<InstanceNumber>.dcm``, the layout MedZone's cohorts use
    (ingest gives patient folders their pseudonyms); numbered where a name would repeat.
    Deterministic for the same instances."""
    by_patient: dict[str, list[Instance]] = defaultdict(list)
    for inst in instances:
        by_patient[inst.patient_id].append(inst)
    for p_index, patient in enumerate(sorted(by_patient)):
        folder = patient if _SAFE_NAME.match(patient or "") else f"patient-{p_index + 1:04d}"
        series: dict[str, list[Instance]] = defaultdict(list)
        for inst in by_patient[patient]:
            series[inst.series].append(inst)
        by_modality: dict[str, list[str]] = defaultdict(list)
        for uid in sorted(series, key=lambda u: (series[u][0].study_date,
                                                 _number(series[u][0].series_number), u)):
            modality = series[uid][0].modality
            by_modality[modality if _SAFE_NAME.match(modality or "") else "OT"].append(uid)
        for modality, uids in by_modality.items():
            for s_index, uid in enumerate(uids):
                name = modality if len(uids) == 1 else f"{modality}-{s_index + 1}"
                members = sorted(series[uid], key=lambda i: (_number(i.instance_number), i.sop))
                numbers = [_number(i.instance_number)[0] for i in members]
                unique = len(set(numbers)) == len(numbers) and max(numbers) < 1 << 30
                for k, inst in enumerate(members):
                    n = numbers[k] if unique else k + 1
                    inst.rel = f"{folder}/{name}/{n:04d}.dcm"
    return instances


# --- the transports --------------------------------------------------------------------

def _quiet_libraries() -> None:
    # Their log lines (UIDs, tracebacks of refused associations) are not for the terminal:
    # every failure becomes one line of ours.
    for name in ("pynetdicom", "dicomweb_client"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


class _DicomWeb:
    def __init__(self, node: PacsNode, credentials: PacsCredentials | None):
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.node = node
        self.credentials = credentials
        self.session = requests.Session()
        if credentials is not None:
            self.session.auth = (credentials.username, credentials.password)
        self.client = DICOMwebClient(node.url, session=self.session, timeout=TIMEOUT_S)
        # It retries every failed request (a refused connection too) and 429/503/504
        # answers, with exponential back-off: 3 tries, 1 s and 2 s apart, rather than its
        # 5 over 30 s, so a wrong URL is reported at once.
        self.client.set_http_retry_params(retry=True, max_attempts=3,
                                          wait_exponential_multiplier=500)

    def close(self) -> None:
        self.session.close()

    def fail(self, err: BaseException, doing: str) -> PacsError:
        import requests

        where = f"the PACS at {self.node.label}"
        response = getattr(err, "response", None)
        if isinstance(err, requests.exceptions.ConnectionError):
            why = "connection refused" if "refused" in str(err).lower() else "no connection"
            text = f"cannot reach {where} ({why}) while {doing}"
        elif isinstance(err, requests.exceptions.Timeout):
            text = f"{where} did not answer within {TIMEOUT_S} s while {doing}"
        elif response is not None and response.status_code in (401, 403):
            text = (f"{where} refused the credentials (HTTP {response.status_code})"
                    if self.credentials is not None else
                    f"{where} asks for credentials (HTTP {response.status_code}): give "
                    f"--pacs-credentials FILE or {ENV_USERNAME}/{ENV_PASSWORD}")
        elif response is not None:
            text = f"{where} answered HTTP {response.status_code} while {doing}"
        else:
            text = f"{where}: {type(err).__name__} while {doing}: {_first_line(err)}"
        return PacsError(self.credentials.scrub(text) if self.credentials else text)

    @staticmethod
    def _paged(search, key_tag: str, **kw) -> list[dict]:
        """Every result of a QIDO search, PAGE at a time. Stops at a page that brings
        nothing new: some servers (Orthanc's DICOMweb 1.7 with ModalitiesInStudy) ignore
        ``offset`` and would answer the same page for ever."""
        seen: dict[str, dict] = {}
        offset = 0
        while True:
            page = search(limit=PAGE, offset=offset, **kw)
            new = {str(item.get(key_tag, {}).get("Value", [""])[0]): item for item in page}
            new = {k: v for k, v in new.items() if k not in seen}
            seen.update(new)
            if len(page) < PAGE or not new:
                return list(seen.values())
            offset += len(page)

    def find(self, selection: Selection) -> list[Instance]:
        from pydicom import Dataset

        studies: dict[str, Dataset] = {}
        unmatched: list[dict] = []
        for search in selection.filters():
            try:
                found = self._paged(self.client.search_for_studies, "0020000D",
                                    search_filters=search,
                                    fields=["PatientID", "StudyDate", "AccessionNumber"])
            except Exception as err:  # noqa: BLE001 - each becomes one line
                raise self.fail(err, "searching for studies") from None
            found = [Dataset.from_json(item) for item in found]
            unmatched = _check_matched(unmatched, search, found)
            for ds in found:
                if ds.get("StudyInstanceUID"):
                    studies[str(ds.StudyInstanceUID)] = ds
        _raise_unmatched(unmatched, self.node, selection)
        instances = []
        for uid, study in sorted(studies.items()):
            try:
                found = self._paged(
                    self.client.search_for_instances, "00080018", study_instance_uid=uid,
                    fields=["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                            "InstanceNumber", "Modality", "SeriesNumber"])
            except Exception as err:  # noqa: BLE001
                raise self.fail(err, "listing a study's instances") from None
            for item in found:
                ds = Dataset.from_json(item)
                instances.append(Instance.listed(uid, study, ds, series=ds))
        return instances

    def fetch(self, pending: list[Instance], sink: "_Sink") -> None:
        for inst in pending:
            try:
                ds = self.client.retrieve_instance(inst.study, inst.series, inst.sop)
            except Exception as err:  # noqa: BLE001
                raise self.fail(err, "downloading an instance") from None
            sink.save(inst, lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True))


class _Dimse:
    def __init__(self, node: PacsNode, credentials: PacsCredentials | None, calling_aet: str,
                 move_to: tuple[str, int] | None):
        self.node = node
        self.credentials = credentials
        self.calling_aet = calling_aet
        self.move_to = move_to

    def close(self) -> None:
        pass

    def _ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs
        return ae

    def _associate(self, ae, doing: str, ext_neg=(), handlers=()):
        from pynetdicom.pdu_primitives import UserIdentityNegotiation

        where = f"the DICOM node {self.node.label}"
        try:
            socket.create_connection((self.node.host, self.node.port), timeout=TIMEOUT_S).close()
        except OSError as err:
            why = "connection refused" if isinstance(err, ConnectionRefusedError) else \
                (err.strerror or type(err).__name__)
            raise PacsError(f"cannot reach {where} ({why}) while {doing}") from None
        ext = list(ext_neg)
        if self.credentials is not None:
            identity = UserIdentityNegotiation()
            identity.user_identity_type = 2
            identity.primary_field = self.credentials.username.encode()
            identity.secondary_field = self.credentials.password.encode()
            ext.append(identity)
        assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.aet,
                             ext_neg=ext or None, evt_handlers=list(handlers) or None)
        if not assoc.is_established:
            if assoc.is_rejected or assoc.is_aborted:  # Orthanc aborts a wrong called AET
                raise PacsError(f"{where} refused the association while {doing} (is "
                                f"{self.calling_aet} declared there, and is {self.node.aet} "
                                "its AE title?)")
            raise PacsError(f"{where} did not accept an association while {doing}")
        return assoc

    def _find(self, assoc, identifier, doing: str, expect: int | None = None) -> list:
        """The C-FIND's matches. With *expect* (the count the PACS gave one level up),
        asked again up to ATTEMPTS times until the count agrees: pynetdicom's reactor
        thread can take a response off the queue under load (it logs "Received unexpected
        C-FIND service message"), and a silently shorter list would import a study in part."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        for _ in range(ATTEMPTS):
            out = []
            for status, found in assoc.send_c_find(identifier, FIND):
                if status is None or "Status" not in status:
                    raise PacsError(f"the DICOM node {self.node.label} stopped answering "
                                    f"while {doing}")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01) and found is not None:
                    out.append(found)
                elif code != 0x0000:
                    raise PacsError(f"the DICOM node {self.node.label} failed a C-FIND while "
                                    f"{doing} (status 0x{code:04X})")
            if expect is None or len(out) == expect:
                return out
        raise PacsError(f"the DICOM node {self.node.label} listed {len(out)} of the {expect} "
                        f"instances it counts while {doing}")

    def _retrieve(self, assoc, model, move: bool, batch: list[Instance], doing: str) -> int | None:
        """One C-GET or C-MOVE of *batch* (one series); its final status."""
        from pydicom import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID, q.SeriesInstanceUID = batch[0].study, batch[0].series
        q.SOPInstanceUID = [inst.sop for inst in batch]
        responses = (assoc.send_c_move(q, self.calling_aet, model) if move else
                     assoc.send_c_get(q, model))
        code = None
        for status, _ in responses:
            if status is None or "Status" not in status:
                raise PacsError(f"the DICOM node {self.node.label} stopped answering while "
                                f"{doing}")
            code = int(status.Status)
        return code

    def find(self, selection: Selection) -> list[Instance]:
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        ae = self._ae()
        ae.add_requested_context(FIND)
        assoc = self._associate(ae, "searching for studies")
        try:
            studies, unmatched = {}, []
            for search in selection.filters():
                q = Dataset()
                q.QueryRetrieveLevel = "STUDY"
                for key in ("StudyInstanceUID", "PatientID", "StudyDate", "AccessionNumber"):
                    setattr(q, key, "")
                for key, value in search.items():
                    setattr(q, key, value)
                found = self._find(assoc, q, "searching for studies")
                unmatched = _check_matched(unmatched, search, found)
                for ds in found:
                    if ds.get("StudyInstanceUID"):
                        studies[str(ds.StudyInstanceUID)] = ds
            _raise_unmatched(unmatched, self.node, selection)
            instances = []
            for uid, study in sorted(studies.items()):
                q = Dataset()
                q.QueryRetrieveLevel = "SERIES"
                q.StudyInstanceUID = uid
                q.SeriesInstanceUID = q.Modality = q.SeriesNumber = ""
                q.NumberOfSeriesRelatedInstances = ""
                for series in self._find(assoc, q, "listing a study's series"):
                    q = Dataset()
                    q.QueryRetrieveLevel = "IMAGE"
                    q.StudyInstanceUID = uid
                    q.SeriesInstanceUID = series.SeriesInstanceUID
                    q.SOPInstanceUID = q.SOPClassUID = q.InstanceNumber = ""
                    count = series.get("NumberOfSeriesRelatedInstances")
                    for ds in self._find(assoc, q, "listing a series' instances",
                                         expect=int(count) if count not in (None, "") else None):
                        instances.append(Instance.listed(uid, study, ds, series=series))
            return instances
        finally:
            assoc.release()

    def fetch(self, pending: list[Instance], sink: "_Sink") -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context, build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        by_sop = {inst.sop: inst for inst in pending}
        classes = sorted({inst.sop_class for inst in pending if inst.sop_class})
        storage = [build_context(c, ALL_TRANSFER_SYNTAXES) for c in classes]
        errors: list[str] = []

        def on_store(event):
            inst = by_sop.get(str(event.request.AffectedSOPInstanceUID))
            if inst is None:
                return 0xA700  # not asked for: refused
            try:
                sink.save(inst, lambda tmp: tmp.write_bytes(event.encoded_dataset()))
            except Exception as err:  # noqa: BLE001 - reported once the C-GET/C-MOVE ends
                errors.append(str(err) if isinstance(err, MedZoneError) else _first_line(err))
                return 0xA700
            return 0x0000

        ae = self._ae()
        server = None
        if self.move_to is None:
            model, doing = GET, "downloading (C-GET)"
            ae.add_requested_context(GET)
            for ctx in storage:
                ae.add_requested_context(ctx.abstract_syntax, ctx.transfer_syntax)
            assoc = self._associate(ae, doing, ext_neg=[build_role(c, scp_role=True)
                                                        for c in classes],
                                    handlers=[(evt.EVT_C_STORE, on_store)])
        else:
            model, doing = MOVE, "downloading (C-MOVE)"
            ae.add_requested_context(MOVE)
            try:
                server = ae.start_server(self.move_to, block=False, contexts=storage,
                                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
            except OSError as err:
                raise PacsError(f"cannot receive C-MOVE on {self.move_to[0]}:{self.move_to[1]} "
                                f"({err.strerror or err})") from None
            try:
                assoc = self._associate(ae, doing)
            except BaseException:
                server.shutdown()
                raise
        # One request per series (UID list matching), BATCH instances at most: a request
        # per instance costs the PACS a job each.
        batches = []
        by_series: dict[tuple[str, str], list[Instance]] = defaultdict(list)
        for inst in pending:
            by_series[(inst.study, inst.series)].append(inst)
        for members in by_series.values():
            batches += [members[i:i + BATCH] for i in range(0, len(members), BATCH)]
        try:
            for batch in batches:
                # Asked again for what did not arrive (see _find: a response can go missing).
                for attempt in range(ATTEMPTS):
                    code = self._retrieve(assoc, model, server is not None, batch, doing)
                    if errors:
                        raise PacsError(errors[0])
                    missing = [inst for inst in batch if not sink.has(inst)]
                    if not missing:
                        break
                    if attempt == ATTEMPTS - 1:
                        raise PacsError(f"the DICOM node {self.node.label} did not deliver "
                                        f"{len(missing)} of {len(batch)} instances of a "
                                        f"series while {doing} (status 0x{(code or 0):04X})")
                    batch = missing
        finally:
            if assoc.is_established:
                assoc.release()
            if server is not None:
                server.shutdown()


def _check_matched(unmatched: list[dict], search: dict, found: list) -> list[dict]:
    """*unmatched* plus *search* if it found no study."""
    return unmatched + ([search] if not any(ds.get("StudyInstanceUID") for ds in found) else [])


def _raise_unmatched(unmatched: list[dict], node: PacsNode, selection: Selection) -> None:
    """Every accession number and UID asked for must find a study: a provider's list that
    is silently imported in part would be worse than a refusal."""
    if not unmatched:
        return
    if len(unmatched) == len(selection.filters()):
        raise PacsError(f"no study on {node.label} matches the selection ({_describe(selection)})")
    acc = sum("AccessionNumber" in f and len(f) == 1 for f in unmatched)
    uids = sum("StudyInstanceUID" in f and len(f) == 1 for f in unmatched)
    what = [f"{acc} of {len(selection.accessions)} accession numbers"] if acc else []
    what += [f"{uids} of {len(selection.study_uids)} study UIDs"] if uids else []
    what += ["the query"] if len(unmatched) > acc + uids else []
    raise PacsError(f"{' and '.join(what)} match no study on {node.label}; nothing was imported")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- the download folder ---------------------------------------------------------------

def default_download_root() -> Path:
    raw = os.environ.get(ENV_DOWNLOAD_DIR)
    if raw:
        return Path(raw).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "medzone" / "pacs"


class _Sink:
    """The download folder: ``files/`` (what ingest reads), ``tmp/`` (instances being
    written), ``plan.json`` (the instances found, and their paths)."""

    def __init__(self, root: Path):
        self.root = root
        self.files = root / "files"
        self.tmp = root / "tmp"
        self.bar = None
        self.bytes = 0
        self.count = 0
        for folder in (root, self.files, self.tmp):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():  # what a killed import was writing
            staging.remove_tree(leftover)

    def has(self, inst: Instance) -> bool:
        return (self.files / inst.rel).is_file()

    def save(self, inst: Instance, write) -> None:
        """Write *inst* with ``write(tmp_path)``, check it, then give it its final name."""
        import pydicom

        tmp = self.tmp / f"{hashlib.sha256(inst.sop.encode()).hexdigest()[:24]}.part"
        try:
            write(tmp)
        except OSError as err:  # e.g. a full disk
            tmp.unlink(missing_ok=True)
            raise PacsError(f"cannot write to the download folder {self.root} "
                            f"({err.strerror or err})") from None
        try:
            ds = pydicom.dcmread(tmp)
            if str(ds.get("SOPInstanceUID", "")) != inst.sop:
                raise PacsError("the PACS sent another instance than the one asked for")
            if "PixelData" in ds and len(ds.PixelData) == 0:
                raise PacsError("the PACS sent an instance without its pixel data")
        except PacsError:
            tmp.unlink(missing_ok=True)
            raise
        except Exception as err:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            raise PacsError(f"the PACS sent an unreadable instance ({_first_line(err)})") from None
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        final = self.files / inst.rel
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        size = tmp.stat().st_size
        os.rename(tmp, final)
        self.bytes += size
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.bytes / 1e6:.1f} MB", refresh=False)


# --- the service function --------------------------------------------------------------

@dataclass
class PacsImportReport:
    source: str
    transport: str
    studies: int
    instances: int
    downloaded: int
    skipped: int
    download_bytes: int
    download_seconds: float
    ingest: IngestReport

    def as_dict(self) -> dict:
        return {**self.ingest.as_dict(),
                "pacs": {"source": self.source, "transport": self.transport,
                         "studies": self.studies, "instances": self.instances,
                         "downloaded": self.downloaded, "skipped": self.skipped,
                         "download_bytes": self.download_bytes,
                         "download_seconds": round(self.download_seconds, 3)}}

    def summary_line(self) -> str:
        rate = self.download_bytes / 1e6 / self.download_seconds if self.download_seconds else 0
        return (f"imported {self.studies} studies ({self.instances} instances) from "
                f"{self.source} over {self.transport}: {self.downloaded} downloaded "
                f"({self.download_bytes / 1e6:.1f} MB, {rate:.1f} MB/s), {self.skipped} "
                f"already there\n{self.ingest.summary_line()}")


def import_from_pacs(home: MedZoneHome, store, dataset_id: str, *, source: str,
                     accessions=(), study_uids=(), query: dict | None = None,
                     credentials: PacsCredentials | None = None,
                     calling_aet: str | None = None, move_to: tuple[str, int] | None = None,
                     download_root: str | os.PathLike | None = None,
                     title: str | None = None, deidentify: bool = False,
                     pseudonym_key: bytes | None = None, actor: str,
                     progress: bool = True) -> PacsImportReport:
    """Find the selected studies on *source*, download them (resuming what an earlier run
    with the same source and selection left) and ingest them as *dataset_id*."""
    from tqdm import tqdm

    dataset_id = validate_dataset_id(dataset_id)
    node = parse_pacs_source(source)
    selection = Selection.of(accessions, study_uids, query)
    calling_aet = (calling_aet or os.environ.get(ENV_CALLING_AET) or DEFAULT_CALLING_AET).strip()
    if not 0 < len(calling_aet) <= 16 or "\\" in calling_aet:
        raise InvalidInput("the calling AE title must be 1 to 16 characters")
    if move_to is not None and node.kind != "dimse":
        raise InvalidInput("--pacs-move-to applies to a DICOM node (AET@host:port) only")
    home.ensure()
    with store.session() as session:
        if dataset_exists(session, dataset_id):
            raise Conflict(f"dataset '{dataset_id}' exists already")
    root = Path(download_root or default_download_root()).expanduser().resolve()
    if root.is_relative_to(home.root):
        raise InvalidInput(f"{root}: the PACS download folder must be outside MEDZONE_HOME "
                           "(it holds the studies before de-identification)")
    # Same source and selection, same folder: that is what makes a rerun resume.
    key = hashlib.sha256(json.dumps([node.label, selection.accessions, selection.study_uids,
                                     selection.query]).encode()).hexdigest()[:16]
    folder = root / f"{dataset_id}-{key}"
    _quiet_libraries()
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = open(root / f"{folder.name}.lock", "a")
    except OSError as err:
        raise InvalidInput(f"{root}: cannot use as the PACS download folder "
                           f"({err.strerror or err})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"an import of the same studies into '{dataset_id}' is running "
                           "already") from None
        transport = (_DicomWeb(node, credentials) if node.kind == "dicomweb" else
                     _Dimse(node, credentials, calling_aet, move_to))
        try:
            sink = _Sink(folder)
            plan_file = folder / "plan.json"
            if plan_file.is_file():
                plan = [Instance(**row) for row in json.loads(plan_file.read_text())]
            else:
                plan = assign_paths([i for i in transport.find(selection) if i.sop and i.series])
                if not plan:
                    raise PacsError(f"no study on {node.label} matches the selection "
                                    f"({_describe(selection)})")
                tmp = folder / "plan.json.part"
                tmp.write_text(json.dumps([vars(i) for i in plan]))
                os.replace(tmp, plan_file)
            pending = [inst for inst in plan if not sink.has(inst)]
            started = time.perf_counter()
            with tqdm(total=len(plan), initial=len(plan) - len(pending), unit="instance",
                      desc=f"download {dataset_id}", file=sys.stderr, disable=not progress,
                      dynamic_ncols=True) as bar:
                sink.bar = bar
                try:
                    if pending:
                        transport.fetch(pending, sink)
                except PacsError as err:
                    done = len(plan) - len(pending) + sink.count
                    raise PacsError(f"{err}; download stopped after {done} of {len(plan)} "
                                    "instances, nothing was published (run the same command "
                                    "again to resume)") from None
                finally:
                    sink.bar = None
            download_seconds = time.perf_counter() - started
        finally:
            transport.close()
        report = ingest_dataset(home, store, dataset_id, sink.files, title=title,
                                deidentify=deidentify, pseudonym_key=pseudonym_key,
                                actor=actor, progress=progress)
        # Published: the identifying download is no longer needed.
        staging.remove_tree(folder)
        (root / f"{folder.name}.lock").unlink(missing_ok=True)
    return PacsImportReport(source=node.label, transport=("DICOMweb" if node.kind == "dicomweb"
                                                          else "DIMSE C-MOVE" if move_to
                                                          else "DIMSE C-GET"),
                            studies=len({i.study for i in plan}), instances=len(plan),
                            downloaded=sink.count, skipped=len(plan) - len(pending),
                            download_bytes=sink.bytes, download_seconds=download_seconds,
                            ingest=report)


def _describe(selection: Selection) -> str:
    parts = []
    if selection.accessions:
        parts.append(f"{len(selection.accessions)} accession numbers")
    if selection.study_uids:
        parts.append(f"{len(selection.study_uids)} study UIDs")
    if selection.query:
        parts.append("query " + ", ".join(k for k, _ in selection.query))
    return "; ".join(parts)
