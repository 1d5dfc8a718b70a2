"""Synthetic demo cohort: chest CT, chest X-ray and clinical tables with fake identities.

``medzone demo-data DIR`` writes a folder shaped like a real hospital export, so that ingest,
de-identification, the kernel helpers and the export screen all have real work to do::

    DIR/clinical.csv                          one row per patient
    DIR/nodules.csv                           one row per CT nodule
    DIR/<patient_id>/CT/0001.dcm …            one axial chest CT series, one file per slice
    DIR/<patient_id>/CXR/0001.dcm             one PA chest X-ray (CR or DX)
    DIR/<patient_id>/ct_nodule_mask.nii.gz    uint8 nodule mask on the CT grid

Every identity is invented (names, MRNs, resident-registration-shaped numbers, phones,
addresses, hospitals), but shaped like the real thing and spread where real exports spread
it: folder names, DICOM headers, a vendor private block, free-text comments and notes.
The images are analytic phantoms: HU-calibrated anatomy for the CT, an attenuation line
integral for the X-ray, with the CXR class (normal, nodule, cardiomegaly, effusion) and the
CT nodules visible and consistent with the tables.

The same seed gives byte-identical files: every random draw comes from generators seeded
from it, UIDs are hashed from it, and nothing reads the clock into a file.
"""

from __future__ import annotations

import csv
import gzip
import math
import numbers
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np

# pydicom, nibabel, scipy and tqdm are imported where they are used: together they take
# 0.5 s to import, and every `medzone` command imports this module.

from .errors import InvalidInput

MAX_PATIENTS = 1000

CLINICAL_COLUMNS = (
    "patient_id", "name", "name_en", "rrn", "birth_date", "phone", "address", "institution",
    "accession_ct", "accession_cxr", "age", "sex", "height_cm", "weight_kg", "smoking",
    "pack_years", "cxr_label", "ct_nodule_count", "visit_date", "notes",
)
NODULE_COLUMNS = (
    "patient_id", "series_uid", "nodule_id", "center_x_mm", "center_y_mm", "center_z_mm",
    "center_col", "center_row", "center_slice", "diameter_mm", "volume_mm3",
)
CXR_LABELS = ("normal", "nodule", "cardiomegaly", "effusion")
_EFFUSION_SIDES = ((-1,), (1,), (-1, 1))  # right, left, both

# Label quotas cycle through this pattern (40% normal, 20% each finding), so that even a
# four-patient cohort shows every class; the order is then shuffled per seed.
_LABEL_CYCLE = ("nodule", "normal", "cardiomegaly", "effusion", "normal",
                "nodule", "normal", "cardiomegaly", "normal", "effusion")
FOREIGN_SHARE = 0.15
MONOCHROME1_SHARE = 1 / 3
NOTES_WITH_IDENTIFIERS_SHARE = 0.55

PRIVATE_CREATOR = "MEDZONE DEMO PRIVATE"
PRIVATE_GROUP = 0x0009
MANUFACTURER = "MedZone Synthetic"

# CT values in Hounsfield units.
HU_AIR = -1000.0
HU_LUNG = -860.0
HU_FAT = -100.0
HU_MUSCLE = 45.0
HU_MEDIASTINUM = 35.0
HU_LIVER = 60.0
HU_SPLEEN = 48.0
HU_MYOCARDIUM = 45.0
HU_CONTRAST_BLOOD = 180.0
HU_LUNG_VESSEL = 150.0
HU_EFFUSION = 12.0
HU_CORTICAL_BONE = 750.0
HU_CANCELLOUS_BONE = 420.0
HU_RIB = 600.0
HU_CARTILAGE = 130.0
HU_DISC = 90.0
HU_CSF = 15.0
HU_TABLE_SHELL = 250.0
HU_TABLE_FOAM = -300.0
CT_NOISE_HU = 12.0
CT_RESCALE_INTERCEPT = -1024
CXR_FOV_MM = 358.4  # 256 px x 1.4 mm
CXR_MAX = 4095  # 12-bit

# The anatomy is drawn for a 320 mm field of view and scaled to the grid's actual one.
_NOMINAL_FOV_MM = 320.0


# --- fake people and places -------------------------------------------------------------

# (hangul, romanized) family names, most frequent first.
_KO_FAMILY = (
    ("김", "Kim"), ("이", "Lee"), ("박", "Park"), ("최", "Choi"), ("정", "Jung"), ("강", "Kang"),
    ("조", "Cho"), ("윤", "Yoon"), ("장", "Jang"), ("임", "Lim"), ("한", "Han"), ("오", "Oh"),
    ("서", "Seo"), ("신", "Shin"), ("권", "Kwon"), ("황", "Hwang"), ("안", "Ahn"), ("송", "Song"),
    ("류", "Ryu"), ("홍", "Hong"),
)
_KO_GIVEN = {
    "M": (("민준", "Minjun"), ("서준", "Seojun"), ("도윤", "Doyun"), ("예준", "Yejun"),
          ("시우", "Siwoo"), ("하준", "Hajun"), ("지호", "Jiho"), ("지훈", "Jihun"),
          ("준서", "Junseo"), ("건우", "Geonwoo"), ("현우", "Hyunwoo"), ("성민", "Seongmin"),
          ("영수", "Youngsoo"), ("정훈", "Junghun"), ("상철", "Sangcheol"), ("동현", "Donghyun"),
          ("재현", "Jaehyun"), ("광수", "Kwangsoo"), ("병철", "Byungcheol"), ("용호", "Yongho")),
    "F": (("서연", "Seoyeon"), ("서윤", "Seoyun"), ("지우", "Jiwoo"), ("하은", "Haeun"),
          ("민서", "Minseo"), ("지민", "Jimin"), ("수빈", "Subin"), ("예은", "Yeeun"),
          ("영희", "Younghee"), ("미경", "Mikyung"), ("은정", "Eunjung"), ("혜진", "Hyejin"),
          ("수진", "Sujin"), ("지현", "Jihyun"), ("순자", "Sunja"), ("정숙", "Jungsook"),
          ("미숙", "Misook"), ("경희", "Kyunghee"), ("옥순", "Oksoon"), ("현주", "Hyunjoo")),
}
_EN_FAMILY = ("Smith", "Johnson", "Brown", "Garcia", "Miller", "Wilson", "Nguyen", "Tanaka",
              "Petrov", "Schmidt", "Martin", "Lopez", "Novak", "Silva", "Walker", "Khan")
_EN_GIVEN = {
    "M": ("John", "David", "Michael", "James", "Daniel", "Thomas", "Ivan", "Carlos", "Hiroshi",
          "Ahmed", "Lucas", "Peter"),
    "F": ("Mary", "Sarah", "Emily", "Anna", "Laura", "Maria", "Olga", "Yuki", "Fatima",
          "Sophie", "Linda", "Grace"),
}
# (city, district) pairs and road names for fake street addresses.
_KO_PLACES = (
    ("서울특별시", "강남구"), ("서울특별시", "마포구"), ("서울특별시", "노원구"),
    ("서울특별시", "송파구"), ("부산광역시", "해운대구"), ("부산광역시", "동래구"),
    ("대구광역시", "수성구"), ("인천광역시", "연수구"), ("광주광역시", "북구"),
    ("대전광역시", "유성구"), ("경기도 성남시", "분당구"), ("경기도 수원시", "영통구"),
    ("경기도 고양시", "일산동구"), ("충청북도 청주시", "흥덕구"), ("전라북도 전주시", "완산구"),
)
_KO_ROADS = ("중앙로", "문화로", "은행나무길", "한빛로", "새솔로", "푸른숲길", "햇살로", "누리로",
             "별빛로", "하늘마루길", "솔빛로", "가람로")
# (name, address, short code) of invented hospitals.
_INSTITUTIONS = (
    ("한빛대학교병원", "서울특별시 종로구 한빛로 101", "HB"),
    ("새솔종합병원", "부산광역시 해운대구 새솔로 55", "SS"),
    ("푸른숲의료원", "대전광역시 유성구 푸른숲길 291", "PS"),
    ("누리시립병원", "인천광역시 남동구 누리로 29", "NR"),
)
# Fake physicians and technologists, named in DICOM person-name form.
_DOCTORS = ("Park^Jisoo=박^지수", "Lee^Hyunseok=이^현석", "Choi^Eunbi=최^은비",
            "Kang^Minho=강^민호", "Yoon^Sera=윤^세라", "Jang^Woojin=장^우진")
_TECHNOLOGISTS = ("Oh^Taeyang=오^태양", "Seo^Hana=서^하나", "Kwon^Dojin=권^도진",
                  "Hwang^Bora=황^보라")

# Free-text notes. {name} and {phone} make a note identifying; the rest are clinical only.
_NOTES_IDENTIFYING_KO = (
    "{name} 님 {phone} 추적 CT 예정",
    "{name} 환자 보호자 연락처 {phone}, 결과 설명 요망",
    "본인 연락처 {phone}. 다음 외래 시 흉부 CT 결과 설명",
    "{name} 님 흉부 X선 이상 소견으로 CT 시행",
    "{name} 님, 검사 결과 문의 전화 ({phone})",
)
_NOTES_IDENTIFYING_EN = (
    "Pt {name} ({phone}) to return for follow-up CT",
    "Called {name} at {phone}: results discussed",
    "{name} asked for a copy of the CT report; contact {phone}",
)
_NOTES_PLAIN_KO = ("정기 검진 결과 설명 예정", "기침 2주 지속, 흉부 X선 시행", "고혈압 약 복용 중",
                   "당뇨 병력 있음, 조영제 사용 전 신기능 확인", "건강검진 목적 내원")
_NOTES_PLAIN_EN = ("No known drug allergies.", "Chronic cough for three weeks; CXR ordered.",
                   "Routine health screening.", "Shortness of breath on exertion.")
_LABEL_NOTES = {
    "normal": "",
    "nodule": " 폐결절 추적 관찰 필요",
    "cardiomegaly": " 심비대 소견, 심초음파 권유",
    "effusion": " 흉수 소견, 흉부외과 협진",
}


@dataclass(frozen=True)
class Identity:
    """One fake patient as the hospital knows them."""

    patient_id: str  # the MRN; also the folder name
    family_en: str
    given_en: str
    family_ko: str  # "" for foreign patients
    given_ko: str
    sex: str
    birth_date: date
    visit_date: date
    rrn: str
    phone: str
    address: str
    institution: str
    institution_address: str
    institution_code: str
    accession_ct: str
    accession_cxr: str

    @property
    def foreign(self) -> bool:
        return not self.family_ko

    @property
    def name(self) -> str:
        """The name as written in the clinical table: Hangul, or the English name."""
        return self.family_ko + self.given_ko if not self.foreign else self.name_en

    @property
    def name_en(self) -> str:
        return f"{self.given_en} {self.family_en}"

    @property
    def dicom_name(self) -> str:
        """PN value: alphabetic group, plus the ideographic group for Korean names."""
        alphabetic = f"{self.family_en}^{self.given_en}"
        return alphabetic if self.foreign else f"{alphabetic}={self.family_ko}^{self.given_ko}"

    @property
    def age(self) -> int:
        return _age_on(self.birth_date, self.visit_date)


@dataclass(frozen=True)
class ClinicalFacts:
    height_cm: float
    weight_kg: float
    smoking: str
    pack_years: int
    cxr_label: str
    notes: str
    effusion_sides: tuple[int, ...] = ()  # -1 right, +1 left; the CT and the X-ray agree

    @property
    def bmi(self) -> float:
        return self.weight_kg / (self.height_cm / 100) ** 2


@dataclass(frozen=True)
class CtGrid:
    """Size of the CT series; square pixels, contiguous slices."""

    cols: int = 128
    rows: int = 128
    slices: int = 64
    pixel_mm: float = 2.5
    slice_mm: float = 2.5


@dataclass(frozen=True)
class CtGeometry:
    """Where a CT grid sits in DICOM patient coordinates (LPS, mm).

    Voxel (col, row, slice) has its centre at x0 + col*pixel, y0 + row*pixel,
    z0 + slice*slice_mm: rows run anterior→posterior, columns right→left, and slices
    inferior→superior, i.e. ImageOrientationPatient [1,0,0,0,1,0] and z increasing with
    InstanceNumber.
    """

    grid: CtGrid
    x0: float
    y0: float
    z0: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape of the volume as rendered: (slice, row, col)."""
        return (self.grid.slices, self.grid.rows, self.grid.cols)

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, z of voxel centres, shaped to broadcast against a (slice, row, col) array."""
        g = self.grid
        x = (self.x0 + np.arange(g.cols) * g.pixel_mm).reshape(1, 1, -1)
        y = (self.y0 + np.arange(g.rows) * g.pixel_mm).reshape(1, -1, 1)
        z = (self.z0 + np.arange(g.slices) * g.slice_mm).reshape(-1, 1, 1)
        return x, y, z

    def voxel_to_mm(self, col: int, row: int, slice_: int) -> tuple[float, float, float]:
        g = self.grid
        return (round(self.x0 + col * g.pixel_mm, 4), round(self.y0 + row * g.pixel_mm, 4),
                round(self.z0 + slice_ * g.slice_mm, 4))

    def slice_z(self, slice_: int) -> float:
        return round(self.z0 + slice_ * self.grid.slice_mm, 4)

    def nifti_affine(self) -> np.ndarray:
        """Affine of an array indexed [col, row, slice], in RAS (x and y of LPS negated)."""
        g = self.grid
        return np.array([
            [-g.pixel_mm, 0.0, 0.0, -self.x0],
            [0.0, -g.pixel_mm, 0.0, -self.y0],
            [0.0, 0.0, g.slice_mm, self.z0],
            [0.0, 0.0, 0.0, 1.0],
        ])


@dataclass(frozen=True)
class Nodule:
    """A nodule as the mask draws it: the voxels whose centres lie within ``radius_mm`` of
    the centre voxel. ``diameter_mm`` is the volume-equivalent diameter of exactly those
    voxels, so that π/6·d³ and the mask agree however coarse the grid."""

    nodule_id: int
    col: int
    row: int
    slice: int
    x_mm: float
    y_mm: float
    z_mm: float
    radius_mm: float
    voxels: int
    voxel_mm3: float

    @property
    def volume_mm3(self) -> float:
        return self.voxels * self.voxel_mm3

    @property
    def diameter_mm(self) -> float:
        return round((6 * self.volume_mm3 / math.pi) ** (1 / 3), 1)


@dataclass
class CtStudy:
    geometry: CtGeometry
    hu: np.ndarray  # float32 (slice, row, col), noise included
    mask: np.ndarray  # uint8 (slice, row, col)
    nodules: list[Nodule]


@dataclass
class CohortSummary:
    """What ``generate_cohort`` wrote; the CLI prints it."""

    out_dir: Path
    patients: int
    files: int
    bytes: int
    seconds: float
    seed: int
    ct_slices: int
    nodules: int
    labels: dict[str, int] = field(default_factory=dict)
    monochrome1: int = 0

    def summary_line(self) -> str:
        labels = ", ".join(f"{k} {v}" for k, v in self.labels.items())
        return (f"{self.patients} patients ({labels}), {self.nodules} CT nodules, "
                f"{self.files} files, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"→ {self.out_dir}")


# --- the public entry point -------------------------------------------------------------

def generate_cohort(out_dir: Path, *, patients: int = 20, seed: int = 0,
                    progress: bool = True) -> CohortSummary:
    """Write a synthetic cohort of ``patients`` patients into the new or empty ``out_dir``."""
    return _generate(Path(out_dir), patients=patients, seed=seed, progress=progress)


def _generate(out_dir: Path, *, patients: int, seed: int, progress: bool,
              ct_grid: CtGrid = CtGrid(), cxr_size: int = 256) -> CohortSummary:
    """``generate_cohort`` with the image sizes open (tests use smaller grids)."""
    _check_arguments(out_dir, patients, seed)
    patients, seed = int(patients), int(seed)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    # Identities are drawn together, in order, by one generator: uniqueness needs the whole
    # cohort. Images get one generator per patient, so a patient's pictures do not depend on
    # how many others there are.
    cohort_rng = np.random.default_rng([seed, 0])
    identities = make_identities(cohort_rng, patients)
    labels = _assign_quota(cohort_rng, patients, _LABEL_CYCLE)
    mono1 = set(_pick_share(cohort_rng, patients, MONOCHROME1_SHARE).tolist())

    from tqdm import tqdm

    clinical_rows, nodule_rows = [], []
    for index in tqdm(range(patients), desc="demo patients", unit="patient",
                      disable=not progress):
        rng = np.random.default_rng([seed, 1, index])
        ident = identities[index]
        facts = make_clinical_facts(rng, ident, labels[index])
        uids = _StudyUids(seed, index)
        ct = render_chest_ct_hu(rng, _ct_geometry(rng, ct_grid), facts)
        patient_dir = out_dir / ident.patient_id
        write_ct_series(patient_dir / "CT", rng, ident, facts, ct, uids)
        write_nifti_mask(patient_dir / "ct_nodule_mask.nii.gz", ct)
        image = render_chest_xray(rng, cxr_size, facts.cxr_label, ct, facts.effusion_sides)
        write_chest_xray(patient_dir / "CXR" / "0001.dcm", rng, ident, facts, image, uids,
                         monochrome1=index in mono1)
        clinical_rows.append(_clinical_row(ident, facts, len(ct.nodules)))
        nodule_rows.extend(_nodule_rows(ident, uids.ct_series, ct))

    _write_csv(out_dir / "clinical.csv", CLINICAL_COLUMNS, clinical_rows)
    _write_csv(out_dir / "nodules.csv", NODULE_COLUMNS, nodule_rows)

    files = [p for p in out_dir.rglob("*") if p.is_file()]
    return CohortSummary(
        out_dir=out_dir, patients=patients, files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        seconds=time.perf_counter() - started, seed=seed,
        ct_slices=patients * ct_grid.slices, nodules=len(nodule_rows),
        labels={label: labels.count(label) for label in CXR_LABELS},
        monochrome1=len(mono1),
    )


def _check_arguments(out_dir: Path, patients, seed) -> None:
    if isinstance(patients, bool) or not isinstance(patients, numbers.Integral):
        raise InvalidInput(f"the number of patients must be a whole number, not {patients!r}")
    if not 1 <= patients <= MAX_PATIENTS:
        raise InvalidInput(f"the number of patients must be between 1 and {MAX_PATIENTS}, "
                           f"not {patients}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidInput(f"the seed must be a whole number ≥ 0, not {seed!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise InvalidInput(f"{out_dir} is not empty; demo data goes into a new or empty folder")


def _assign_quota(rng, n: int, cycle: tuple[str, ...]) -> list[str]:
    values = [cycle[i % len(cycle)] for i in range(n)]
    return [values[i] for i in rng.permutation(n)]


def _pick_share(rng, n: int, share: float, at_least: int = 1) -> np.ndarray:
    """Indices of round(share·n) patients (at least ``at_least``): exact quotas, not coin flips,
    so that small cohorts still show each variant."""
    k = min(n, max(at_least, round(share * n)))
    return np.sort(rng.choice(n, size=k, replace=False))


# --- identities -------------------------------------------------------------------------

def make_identities(rng, n: int) -> list[Identity]:
    """``n`` fake patients whose MRNs, RRNs, phones and accession numbers are all unique."""
    foreign = set(_pick_share(rng, n, FOREIGN_SHARE, at_least=0).tolist())
    used: set[str] = set()
    return [make_identity(rng, foreign=i in foreign, used=used) for i in range(n)]


def make_identity(rng, *, foreign: bool, used: set[str]) -> Identity:
    """One fake patient. ``used`` collects every unique value drawn so far (MRN, RRN, …)."""
    sex = "M" if rng.random() < 0.55 else "F"
    if foreign:
        family_ko = given_ko = ""
        family_en = str(rng.choice(_EN_FAMILY))
        given_en = str(rng.choice(_EN_GIVEN[sex]))
    else:
        family_ko, family_en = _KO_FAMILY[_skewed_index(rng, len(_KO_FAMILY))]
        given_ko, given_en = _KO_GIVEN[sex][rng.integers(len(_KO_GIVEN[sex]))]

    visit = date(2023, 1, 2) + timedelta(days=int(rng.integers(0, 3 * 365)))
    age = int(rng.integers(30, 86))
    # A birthday in the year that makes the patient exactly `age` on the visit date.
    latest = _years_before(visit, age)
    earliest = _years_before(visit, age + 1) + timedelta(days=1)
    birth = earliest + timedelta(days=int(rng.integers(0, (latest - earliest).days + 1)))

    def unique(draw):
        while True:
            value = draw()
            if value not in used:
                used.add(value)
                return value

    institution, institution_address, code = _INSTITUTIONS[rng.integers(len(_INSTITUTIONS))]
    return Identity(
        patient_id=unique(lambda: str(rng.integers(10_000_000, 100_000_000))),
        family_en=family_en, given_en=given_en, family_ko=family_ko, given_ko=given_ko,
        sex=sex, birth_date=birth, visit_date=visit,
        rrn=unique(lambda: make_rrn(rng, birth, sex, foreign)),
        phone=unique(lambda: f"010-{rng.integers(2000, 10000)}-{rng.integers(0, 10000):04d}"),
        address=_fake_address(rng),
        institution=institution, institution_address=institution_address,
        institution_code=code,
        accession_ct=unique(lambda: f"CT{rng.integers(0, 10**10):010d}"),
        accession_cxr=unique(lambda: f"XR{rng.integers(0, 10**10):010d}"),
    )


def make_rrn(rng, birth: date, sex: str, foreign: bool) -> str:
    """A resident-registration-shaped number ``YYMMDD-GNNNNNN`` with a valid check digit.

    G encodes century and sex (1/2 for 1900s births, 3/4 for 2000s; 5/6 and 7/8 for
    foreign residents). The last digit follows the legacy check-digit rule used for the
    numbers issued before October 2020, so validators that use it accept these numbers.
    """
    base = 1 if birth.year < 2000 else 3
    if foreign:
        base += 4
    gender = base + (0 if sex == "M" else 1)
    digits = f"{birth:%y%m%d}{gender}{rng.integers(0, 100_000):05d}"
    return f"{digits[:6]}-{digits[6:]}{rrn_check_digit(digits)}"


def rrn_check_digit(first12: str) -> int:
    weights = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
    total = sum(int(d) * w for d, w in zip(first12, weights))
    return (11 - total % 11) % 10


def _skewed_index(rng, n: int) -> int:
    """Index into a list ordered by frequency: early entries (Kim, Lee, Park) come up most."""
    return min(n - 1, int(rng.exponential(n / 4)))


def _years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February in a non-leap year
        return day.replace(year=day.year - years, day=28)


def _age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _fake_address(rng) -> str:
    city, district = _KO_PLACES[rng.integers(len(_KO_PLACES))]
    road = _KO_ROADS[rng.integers(len(_KO_ROADS))]
    return (f"{city} {district} {road} {rng.integers(1, 400)}, "
            f"{rng.integers(101, 120)}동 {rng.integers(1, 26)}{rng.integers(1, 5):02d}호")


def make_clinical_facts(rng, ident: Identity, cxr_label: str) -> ClinicalFacts:
    male = ident.sex == "M"
    height = rng.normal(171 if male else 158, 6)
    bmi = float(np.clip(rng.normal(23.8, 3.2), 16.5, 36))
    weight = bmi * (height / 100) ** 2
    smoking = str(rng.choice(("never", "former", "current"),
                             p=(0.35, 0.35, 0.30) if male else (0.8, 0.12, 0.08)))
    pack_years = 0 if smoking == "never" else int(rng.integers(3, min(60, ident.age - 15)))
    sides = _EFFUSION_SIDES[rng.integers(3)] if cxr_label == "effusion" else ()
    return ClinicalFacts(round(height, 1), round(weight, 1), smoking, pack_years, cxr_label,
                         _make_note(rng, ident, cxr_label, pack_years), sides)


def _make_note(rng, ident: Identity, cxr_label: str, pack_years: int) -> str:
    english = ident.foreign or rng.random() < 0.2
    if rng.random() < NOTES_WITH_IDENTIFIERS_SHARE:
        templates = _NOTES_IDENTIFYING_EN if english else _NOTES_IDENTIFYING_KO
        name = ident.name_en if english else ident.name
        note = templates[rng.integers(len(templates))].format(name=name, phone=ident.phone)
    else:
        templates = _NOTES_PLAIN_EN if english else _NOTES_PLAIN_KO
        note = templates[rng.integers(len(templates))]
        if pack_years and not english and rng.random() < 0.5:
            note += f" 흡연 {pack_years}갑년, 금연 상담 권유"
    return note + ("" if english else _LABEL_NOTES[cxr_label])


# --- chest CT ---------------------------------------------------------------------------

def _ct_geometry(rng, grid: CtGrid) -> CtGeometry:
    """Centre the field of view on the table axis, with a small per-patient offset in x and
    a per-patient table position in z, as reconstructions from different visits have."""
    x0 = -(grid.cols - 1) / 2 * grid.pixel_mm + int(rng.integers(-8, 9)) * 0.5
    y0 = -(grid.rows - 1) / 2 * grid.pixel_mm
    z0 = -(grid.slices - 1) * grid.slice_mm - 40.0 - int(rng.integers(0, 40)) * 0.5
    return CtGeometry(grid, round(x0, 4), round(y0, 4), round(z0, 4))


@dataclass(frozen=True)
class _Torso:
    """Per-patient body plan in mm (LPS); ``k`` scales the nominal 320 mm anatomy."""

    k: float
    body_a: float  # body half-width
    body_b: float  # body half-depth
    cy: float  # body centre, y
    fat: float  # subcutaneous fat thickness
    cav_a: float  # thoracic cavity half-width (inside muscle and ribs)
    cav_b: float
    med: float  # half-width of the mediastinum behind the heart
    spine_y: float  # centre of the vertebral bodies


def _draw_torso(rng, geom: CtGeometry, bmi: float) -> _Torso:
    g = geom.grid
    fov = min(g.cols, g.rows) * g.pixel_mm
    k = fov / _NOMINAL_FOV_MM
    body_a = rng.uniform(132, 148) * k
    body_b = rng.uniform(96, 108) * k
    cy = geom.y0 + (g.rows - 1) / 2 * g.pixel_mm - rng.uniform(6, 14) * k
    # Fatter patients carry more subcutaneous fat.
    fat = float(np.clip(4 + (bmi - 18) * 1.6, 4, 24)) * k
    wall = 14 * k
    cav_a, cav_b = body_a - fat - wall, body_b - 0.8 * fat - wall
    return _Torso(k, body_a, body_b, cy, fat, cav_a, cav_b, med=20 * k,
                  spine_y=cy + cav_b - 26 * k)


def render_chest_ct_hu(rng, geom: CtGeometry, facts: ClinicalFacts) -> CtStudy:
    """An axial chest CT in HU with 0–3 lung nodules, and their ground-truth mask.

    Painted back to front like a phantom: table, body fat, chest wall and ribs, mediastinum
    and upper abdomen, lungs, then the structures that displace lung (effusion, heart, great
    vessels, airways, spine), the lung vessel trees, the nodules and finally scanner noise.
    """
    torso = _draw_torso(rng, geom, facts.bmi)
    x, y, z = geom.axes_mm()
    span = max(geom.grid.slices - 1, 1) * geom.grid.slice_mm
    s = (z - geom.z0) / span  # 0 at the lowest slice, 1 at the highest
    hu = np.full(geom.shape, HU_AIR, np.float32)

    _paint_table(hu, x, y, torso)
    cavity = _paint_body_wall(hu, x, y, z, torso)
    dome = _diaphragm(rng, x, y, torso)
    _paint_cavity(hu, x, cavity, s, dome)
    lung = _paint_lungs(rng, hu, x, y, s, cavity, dome, torso)
    if facts.effusion_sides:
        _paint_effusion(rng, hu, lung, x, y, s, torso, facts.effusion_sides)
    heart = _heart_radius(rng, x, y, s, torso, enlarged=facts.cxr_label == "cardiomegaly")
    _paint_heart(hu, heart, cavity)
    lung &= ~(heart < 1.15)  # the heart and its pericardium displace lung
    _paint_great_vessels_and_airways(hu, lung, geom, torso)
    _paint_lung_vessels(rng, hu, lung, geom, torso)
    _paint_spine_and_sternum(hu, lung, x, y, z, s, torso)

    nodules = place_nodules(rng, geom, lung, _nodule_diameters(rng, facts.cxr_label))
    mask = _paint_nodules(rng, hu, geom, nodules)
    hu += rng.normal(0.0, CT_NOISE_HU, hu.shape).astype(np.float32)
    return CtStudy(geom, hu, mask, nodules)


def _ellipse(x, y, cx, cy, a, b):
    """Squared normalised radius: < 1 inside the ellipse."""
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2


def _paint_table(hu, x, y, t: _Torso) -> None:
    """A curved carbon table top (two shells around a foam core) under the patient."""
    k = t.k
    top = t.cy + t.body_b + 6 * k - 15 * k * (x / (140 * k)) ** 2  # rises towards the sides
    depth = y - top
    inside = np.abs(x) < 150 * k
    shell = inside & (((depth >= 0) & (depth < 4 * k)) | ((depth >= 22 * k) & (depth < 26 * k)))
    foam = inside & (depth >= 4 * k) & (depth < 22 * k)
    hu[:, shell[0]] = HU_TABLE_SHELL
    hu[:, foam[0]] = HU_TABLE_FOAM


def _paint_body_wall(hu, x, y, z, t: _Torso) -> np.ndarray:
    """Skin-to-pleura layers (fat, muscle, ribs); returns the thoracic cavity (2D, 1×rows×cols)."""
    k = t.k
    body = _ellipse(x, y, 0, t.cy, t.body_a, t.body_b) < 1
    muscle = _ellipse(x, y, 0, t.cy, t.body_a - t.fat, t.body_b - 0.8 * t.fat) < 1
    cavity = _ellipse(x, y, 0, t.cy, t.cav_a, t.cav_b) < 1
    hu[:, body[0]] = HU_FAT
    hu[:, muscle[0]] = HU_MUSCLE

    # Ribs: a ring just outside the pleura, cut into oblique bands. The band phase depends
    # on the angle from the spine so that each rib runs downwards towards the front, as
    # ribs do; anteriorly they end in cartilage.
    ring = (_ellipse(x, y, 0, t.cy, t.cav_a + 9 * k, t.cav_b + 9 * k) < 1) & ~cavity
    angle = np.abs(np.arctan2(x, y - t.cy)) / np.pi  # 0 posterior … 1 anterior
    period = 26 * k
    phase = np.mod((z + 55 * k * angle) / period, 1.0)
    rib = ring & (phase < 9 * k / period) & (np.abs(x) > 12 * k)
    cartilage = rib & (angle > 0.8)
    hu[rib & ~cartilage] = HU_RIB
    hu[cartilage] = HU_CARTILAGE
    return cavity


def _diaphragm(rng, x, y, t: _Torso) -> np.ndarray:
    """Height (in slice fraction s) of the diaphragm under each (x, y): two domes, the right
    one higher (the liver), both lower at the back (the posterior recesses)."""
    right_peak, left_peak = rng.uniform(0.18, 0.25), rng.uniform(0.12, 0.18)
    peak = np.where(x < 0, right_peak, left_peak)
    lateral = ((np.abs(x) - 0.5 * t.cav_a) / (0.55 * t.cav_a)) ** 2
    depth = ((y - t.cy) / t.cav_b) ** 2
    dome = peak - 0.22 * np.clip(lateral + depth, 0, 1.5)
    return dome - 0.08 * np.clip((y - t.cy) / t.cav_b, 0, 1)


def _paint_cavity(hu, x, cavity, s, dome) -> None:
    """Mediastinal soft tissue above the diaphragm; liver (right) and spleen (left) below."""
    below = s < dome
    abdomen = np.where(x < 0, HU_LIVER, HU_SPLEEN)
    region = np.broadcast_to(cavity, hu.shape)
    value = np.where(below, abdomen, HU_MEDIASTINUM)
    hu[region] = np.broadcast_to(value, hu.shape)[region]


def _paint_lungs(rng, hu, x, y, s, cavity, dome, t: _Torso) -> np.ndarray:
    """Two lungs filling the cavity beside the mediastinum, above the diaphragm, narrowing
    towards the apices; HU around -860 with a soft texture and denser dependent (posterior)
    parts, as in a supine scan. Returns the lung mask."""
    k = t.k
    # The apices narrow over the top of the scan range.
    taper = np.where(s > 0.5, np.sqrt(np.clip(1 - ((s - 0.5) / 0.62) ** 2, 0, 1)), 1.0)
    # The mediastinum is wider in front (heart, thymus fat) than behind (oesophagus, aorta).
    medial = t.med + 12 * k * np.clip((t.cy - y) / t.cav_b, 0, 1)
    lung = np.zeros(hu.shape, bool)
    for side in (-1, 1):
        cx, ly = side * 0.5 * t.cav_a, t.cy + 0.05 * t.cav_b
        shape = ((x - cx) / (0.56 * t.cav_a)) ** 2 + ((y - ly) / (0.95 * t.cav_b)) ** 2
        lung |= (shape < taper ** 2) & (side * x > medial) & (s > dome)
    # Keep a few mm of pleura and wall between lung and ribs.
    lung &= _ellipse(x, y, 0, t.cy, t.cav_a - 2 * k, t.cav_b - 2 * k) < 1
    lung &= np.broadcast_to(cavity, hu.shape)

    from scipy import ndimage

    texture = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), 1.5)
    texture *= 18.0 / max(float(texture.std()), 1e-6)
    gravity = 30.0 * (y - t.cy) / t.cav_b
    value = HU_LUNG + texture + gravity
    hu[lung] = np.broadcast_to(value, hu.shape)[lung]
    return lung


def _paint_effusion(rng, hu, lung, x, y, s, t: _Torso, sides) -> None:
    """Pleural fluid layering posteriorly at the lung base (supine)."""
    depth = rng.uniform(0.45, 0.75)
    for side in sides:
        level = 1 - 2 * depth * np.clip(1 - s / 0.7, 0, 1)  # in units of the lung's half-depth
        fluid = lung & (side * x > 0) & ((y - t.cy) / t.cav_b > level)
        hu[fluid] = HU_EFFUSION
        lung &= ~fluid


def _heart_radius(rng, x, y, s, t: _Torso, *, enlarged: bool) -> np.ndarray:
    """Squared normalised radius of the heart ellipsoid (left of midline, anterior, resting
    on the diaphragm); < 1 inside. Cardiomegaly widens it by about a third."""
    k = t.k
    grow = rng.uniform(1.28, 1.38) if enlarged else rng.uniform(0.95, 1.05)
    hx = (12 + 8 * (grow - 1)) * k
    hy = t.cy - 0.25 * t.cav_b
    a, b, c = 52 * k * grow, 42 * k * min(grow, 1.25), 0.28 * min(grow, 1.2)
    return ((x - hx) / a) ** 2 + ((y - hy) / b) ** 2 + ((s - 0.2) / c) ** 2


def _paint_heart(hu, radius, cavity) -> None:
    """Myocardium around contrast-filled chambers (a contrast-enhanced scan)."""
    inside = (radius < 1) & cavity
    hu[inside] = HU_MYOCARDIUM
    hu[inside & (radius < 0.6)] = HU_CONTRAST_BLOOD


def _paint_great_vessels_and_airways(hu, lung, geom: CtGeometry, t: _Torso) -> None:
    """Aorta (ascending, arch, descending), pulmonary trunk and arteries, trachea and main
    bronchi, as capsules in mm. They displace lung."""
    k, g = t.k, geom.grid
    span = max(g.slices - 1, 1) * g.slice_mm

    def zs(frac: float) -> float:
        """Slice fraction (0 lowest slice, 1 highest) → z in mm."""
        return geom.z0 + frac * span

    asc = (-8 * k, t.cy - 0.2 * t.cav_b)
    desc = (24 * k, t.spine_y - 14 * k)
    arch_z = zs(0.86)
    hilum_z = zs(0.55)
    hilum_y = t.cy + 0.05 * t.cav_b
    vessels = [
        ((asc[0], asc[1], zs(0.4)), (asc[0], asc[1], arch_z), 13 * k),
        ((asc[0], asc[1], arch_z), (desc[0], desc[1], arch_z), 12 * k),
        ((desc[0], desc[1], zs(-0.2)), (desc[0], desc[1], arch_z), 11 * k),
        ((12 * k, t.cy - 0.25 * t.cav_b, zs(0.45)), (10 * k, hilum_y - 10 * k, hilum_z), 11 * k),
        ((10 * k, hilum_y - 10 * k, hilum_z), (t.med + 12 * k, hilum_y, hilum_z), 8 * k),
        ((10 * k, hilum_y - 10 * k, hilum_z), (-t.med - 12 * k, hilum_y, hilum_z), 8 * k),
    ]
    for a, b, r in vessels:
        box, w = _capsule_weight(geom, a, b, r)
        if box is not None:
            solid = w > 0.5
            hu[box][solid] = HU_CONTRAST_BLOOD
            lung[box] &= ~solid

    trachea_y = t.spine_y - 36 * k
    carina = (0.0, trachea_y, zs(0.64))
    airways = [((0.0, trachea_y, zs(1.2)), carina, 9 * k)]
    airways += [(carina, (side * (t.med + 6 * k), hilum_y - 4 * k, zs(0.56)), 6 * k)
                for side in (-1, 1)]
    for a, b, r in airways:
        box, dist = _capsule_distance(geom, a, b, r + 2 * k)
        if box is None:
            continue
        hu[box][dist < r + 2 * k] = HU_MUSCLE  # the airway wall
        hu[box][dist < r] = HU_AIR
        lung[box] &= ~(dist < r + 2 * k)


def _capsule_weight(geom: CtGeometry, a, b, radius: float):
    """Partial-volume weight (0…1) of a tube of ``radius`` mm from point a to b (mm), over its
    bounding box only: returns (slices of the box, weight) or (None, None) if off-grid."""
    box, dist = _capsule_distance(geom, a, b, radius)
    if box is None:
        return None, None
    return box, np.clip((radius - dist) / geom.grid.pixel_mm + 0.5, 0, 1).astype(np.float32)


def _capsule_distance(geom: CtGeometry, a, b, radius: float):
    """Distance (mm) of voxel centres from the segment a–b, over the segment's bounding box
    grown by ``radius``: (slices of the box, distances), or (None, None) if off-grid. Working
    on the box alone keeps hundreds of vessel segments cheap."""
    g = geom.grid
    a, b = np.asarray(a, float), np.asarray(b, float)
    lo, hi = np.minimum(a, b) - radius - g.pixel_mm, np.maximum(a, b) + radius + g.pixel_mm
    origin = np.array([geom.x0, geom.y0, geom.z0])
    step = np.array([g.pixel_mm, g.pixel_mm, g.slice_mm])
    size = np.array([g.cols, g.rows, g.slices])
    i0 = np.clip(np.floor((lo - origin) / step).astype(int), 0, size)
    i1 = np.clip(np.ceil((hi - origin) / step).astype(int) + 1, 0, size)
    if np.any(i1 <= i0):
        return None, None
    px = (origin[0] + np.arange(i0[0], i1[0]) * step[0]).reshape(1, 1, -1)
    py = (origin[1] + np.arange(i0[1], i1[1]) * step[1]).reshape(1, -1, 1)
    pz = (origin[2] + np.arange(i0[2], i1[2]) * step[2]).reshape(-1, 1, 1)
    d = b - a
    length2 = max(float(d @ d), 1e-9)
    u = np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / length2, 0, 1)
    dist = np.sqrt((px - a[0] - u * d[0]) ** 2 + (py - a[1] - u * d[1]) ** 2
                   + (pz - a[2] - u * d[2]) ** 2)
    box = (slice(i0[2], i1[2]), slice(i0[1], i1[1]), slice(i0[0], i1[0]))
    return box, dist


def _paint_lung_vessels(rng, hu, lung, geom: CtGeometry, t: _Torso) -> None:
    """Branching pulmonary vessels from each hilum, thinning towards the periphery. Drawn
    with partial volume so that sub-voxel branches still show as faint lines; painted only
    inside the lungs (elsewhere they would merge with the mediastinum anyway)."""
    k, g = t.k, geom.grid
    span = max(g.slices - 1, 1) * g.slice_mm
    hilum_z = geom.z0 + 0.55 * span
    hilum_y = t.cy + 0.05 * t.cav_b
    segments = []
    for side in (-1, 1):
        root = np.array([side * (t.med + 10 * k), hilum_y, hilum_z])
        # Lobar trunks fan out over the lateral half-space: up, out, down, front and back.
        for _ in range(7):
            direction = rng.standard_normal(3) * (0.6, 0.7, 0.8)
            direction[0] = side * (abs(direction[0]) + 0.35)
            _grow_vessel(rng, segments, root, direction, 34 * k, 3.8 * k, depth=5)
    for a, b, r in segments:
        box, w = _capsule_weight(geom, a, b, r)
        if box is None:
            continue
        w = w * lung[box]
        hu[box] += (HU_LUNG_VESSEL - hu[box]) * w


def _grow_vessel(rng, out: list, start, direction, length, radius, depth) -> None:
    direction = direction / np.linalg.norm(direction)
    end = start + direction * length
    out.append((start, end, radius))
    if depth == 0:
        return
    # Two children, turned to opposite sides of a random plane through the parent.
    perp = np.cross(direction, rng.standard_normal(3))
    perp /= max(np.linalg.norm(perp), 1e-9)
    for sign in (1, -1):
        angle = np.radians(rng.uniform(20, 40))
        child = np.cos(angle) * direction + sign * np.sin(angle) * perp
        _grow_vessel(rng, out, end, child, length * rng.uniform(0.7, 0.85),
                     max(radius * 0.75, 0.7), depth - 1)


def _paint_spine_and_sternum(hu, lung, x, y, z, s, t: _Torso) -> None:
    """Vertebral bodies (cancellous core, cortical rim, discs), canal, posterior arch and
    spinous process; the sternum in front."""
    k = t.k
    sy = t.spine_y
    body = _ellipse(x, y, 0, sy, 17 * k, 15 * k)
    cortex = (body < 1) & (body >= 0.7)
    core = body < 0.7
    # Intervertebral discs every ~26 mm along z.
    disc = np.mod(z / (26 * k), 1.0) < 0.2
    hu[np.broadcast_to(core, hu.shape) & ~disc] = HU_CANCELLOUS_BONE
    hu[np.broadcast_to(cortex, hu.shape) & ~disc] = HU_CORTICAL_BONE
    hu[np.broadcast_to(body < 1, hu.shape) & disc] = HU_DISC
    canal_y = sy + 25 * k
    canal = _ellipse(x, y, 0, canal_y, 8 * k, 7 * k)
    arch = (_ellipse(x, y, 0, canal_y, 13 * k, 12 * k) < 1) & (canal >= 1)
    spinous = _ellipse(x, y, 0, canal_y + 14 * k, 4 * k, 7 * k) < 1
    transverse = (np.abs(y - canal_y + 2 * k) < 4 * k) & (np.abs(x) < 28 * k) & (np.abs(x) > 8 * k)
    under_skin = _ellipse(x, y, 0, t.cy, t.body_a - 3 * k, t.body_b - 3 * k) < 1
    bone = (arch | spinous | transverse) & (canal >= 1) & under_skin
    hu[:, bone[0]] = HU_CORTICAL_BONE
    hu[:, (canal < 1)[0]] = HU_CSF
    sternum = (_ellipse(x, y, 0, t.cy - t.cav_b - 6 * k, 14 * k, 5 * k) < 1) & (s > 0.3)
    hu[sternum] = HU_CANCELLOUS_BONE
    lung &= ~np.broadcast_to(body < 1.3, lung.shape)


def _nodule_diameters(rng, cxr_label: str) -> list[float]:
    """0–3 nodule diameters (mm). A nodule seen on the X-ray is at least 12 mm in the CT;
    the others are mostly small, the kind the X-ray misses."""
    if cxr_label == "nodule":
        count = int(rng.choice((1, 2, 3), p=(0.6, 0.3, 0.1)))
        sizes = [rng.uniform(12, 25)] + [rng.uniform(6, 14) for _ in range(count - 1)]
    else:
        count = int(rng.choice((0, 1, 2, 3), p=(0.5, 0.3, 0.15, 0.05)))
        sizes = [rng.uniform(6, 14) for _ in range(count)]
    return [round(float(d), 1) for d in sizes]


def place_nodules(rng, geom: CtGeometry, lung: np.ndarray, diameters: list[float]) -> list[Nodule]:
    """Centre each nodule on a lung voxel far enough from the pleura, mediastinum and the
    other nodules that the whole sphere lies in lung. Larger nodules are placed first; a
    nodule that fits nowhere (only on tiny test grids) shrinks, down to 3 mm."""
    from scipy import ndimage

    g = geom.grid
    step = max(g.pixel_mm, g.slice_mm)
    padded = np.pad(lung, 1)  # so that the array border counts as "not lung"
    room = ndimage.distance_transform_edt(padded, sampling=(g.slice_mm, g.pixel_mm, g.pixel_mm))
    room = room[1:-1, 1:-1, 1:-1]
    x, y, z = geom.axes_mm()
    placed: list[Nodule] = []
    for diameter in sorted(diameters, reverse=True):
        while diameter >= 3.0:
            # The drawn ball may reach up to one voxel beyond diameter/2 (see _ball_radius).
            ok = room > diameter / 2 + step
            for other in placed:
                gap = diameter / 2 + other.radius_mm + 3 * step
                ok &= ((x - other.x_mm) ** 2 + (y - other.y_mm) ** 2
                       + (z - other.z_mm) ** 2) > gap ** 2
            candidates = np.flatnonzero(ok)
            if candidates.size:
                sl, row, col = (int(i) for i in np.unravel_index(int(rng.choice(candidates)),
                                                                 ok.shape))
                radius, voxels = _ball_radius(g, diameter)
                placed.append(Nodule(len(placed) + 1, col, row, sl,
                                     *geom.voxel_to_mm(col, row, sl), radius_mm=radius,
                                     voxels=voxels,
                                     voxel_mm3=g.pixel_mm * g.pixel_mm * g.slice_mm))
                break
            diameter = round(diameter * 0.85, 1)
    return placed


def _ball_radius(g: CtGrid, diameter: float) -> tuple[float, int]:
    """Radius (mm) of the voxel-centred digital ball whose volume is closest to a sphere of
    ``diameter``, and its voxel count. On a 2.5 mm grid a 7 mm sphere centred on a voxel
    holds either 7 or 19 voxel centres (109 or 297 mm³ against 180 mm³): choosing the
    nearest shell and reporting its equivalent diameter keeps mask and table consistent."""
    reach = int(math.ceil(diameter / 2 / min(g.pixel_mm, g.slice_mm))) + 2
    offsets = np.arange(-reach, reach + 1)
    d2 = ((offsets[:, None, None] * g.slice_mm) ** 2 + (offsets[None, :, None] * g.pixel_mm) ** 2
          + (offsets[None, None, :] * g.pixel_mm) ** 2).ravel()
    shells, counts = np.unique(d2, return_counts=True)
    cumulative = np.cumsum(counts)
    target = math.pi / 6 * diameter ** 3 / (g.pixel_mm * g.pixel_mm * g.slice_mm)
    best = int(np.argmin(np.abs(cumulative - target)))
    # Halfway to the next shell, so that rounding in the painter cannot add or drop a shell.
    radius2 = (shells[best] + shells[best + 1]) / 2
    return float(math.sqrt(radius2)), int(cumulative[best])


def _paint_nodules(rng, hu, geom: CtGeometry, nodules: list[Nodule]) -> np.ndarray:
    """Solid spheres (-50…+60 HU) and the matching uint8 mask: the same voxels in both."""
    mask = np.zeros(hu.shape, np.uint8)
    x, y, z = geom.axes_mm()
    for n in nodules:
        inside = ((x - n.x_mm) ** 2 + (y - n.y_mm) ** 2 + (z - n.z_mm) ** 2) <= n.radius_mm ** 2
        hu[inside] = rng.uniform(-50, 60)
        mask[inside] = 1
    return mask


def ct_stored_values(hu: np.ndarray) -> np.ndarray:
    """HU → 12-bit unsigned stored values (RescaleIntercept -1024, slope 1)."""
    return np.clip(np.rint(hu) - CT_RESCALE_INTERCEPT, 0, 4095).astype(np.uint16)


# --- chest X-ray ------------------------------------------------------------------------

# Linear attenuation per mm (relative, ~70 keV): what a PA projection sums along each ray.
_MU_SOFT = 0.020
_MU_LUNG = 0.005
_MU_BONE = 0.035  # bone in excess of the soft tissue it replaces


def render_chest_xray(rng, size: int, cxr_label: str, ct: CtStudy | None = None,
                      effusion_sides: tuple[int, ...] = (-1, 1)) -> np.ndarray:
    """A PA chest radiograph as 12-bit values, bones and mediastinum bright (MONOCHROME2).

    The image is the line integral of attenuation through analytic shapes: body, lungs
    (dark), heart, aortic knob, trachea, spine, ribs, clavicles, diaphragm and gastric
    bubble. The class shows the way radiologists see it: a cardiothoracic ratio above 0.5
    for cardiomegaly, a blunted costophrenic angle with a basal meniscus for effusion, a
    round opacity for a nodule (placed where the largest CT nodule of ``ct`` projects).
    Columns run from the patient's right to left, rows from head to feet.
    """
    from scipy import ndimage

    ps = CXR_FOV_MM / size
    sc = rng.uniform(0.93, 1.04)  # patient size
    x = ((np.arange(size) - (size - 1) / 2) * ps).reshape(1, -1) / sc + rng.uniform(-5, 5)
    v = ((np.arange(size) + 0.5) * ps).reshape(-1, 1)
    v = (v - rng.uniform(-8, 8)) / sc  # mm from the image top, in nominal patient units

    atten = _xray_body(x, v)
    lungs, lung_path, domes = _xray_lungs(rng, x, v)
    atten -= (_MU_SOFT - _MU_LUNG) * lung_path
    atten -= _MU_SOFT * 18 * _chord((x / 9) ** 2, 1.0) * (v < 150)  # tracheal air column
    atten += _xray_lung_markings(rng, x, v, lungs)
    hidden = _xray_heart_shadow(rng, x, v, lung_path, enlarged=cxr_label == "cardiomegaly")
    atten += (_MU_SOFT - _MU_LUNG) * hidden
    if cxr_label == "effusion":
        atten += _xray_effusion(rng, x, v, lungs, lung_path - hidden, effusion_sides)
    atten += _xray_bones(x, v)
    atten -= _xray_gastric_bubble(x, v, domes)
    if cxr_label == "nodule":
        atten += _xray_nodule(rng, x, v, ct)

    atten = ndimage.gaussian_filter(atten, 0.7 * 1.4 / ps)  # detector unsharpness
    atten += rng.normal(0, 0.03, atten.shape)  # quantum noise
    # Film-like response: no attenuation → black, dense mediastinum → nearly white.
    value = np.clip(atten / 5.6, 0, 1) ** 1.6
    return np.rint(value * CXR_MAX).astype(np.uint16)


def _chord(dist2, r):
    """Length of a ray through a round object of radius r at squared distance dist2 from its
    axis (0 outside)."""
    return 2 * np.sqrt(np.clip(r ** 2 - dist2, 0, None))


def _xray_body(x, v):
    """Soft tissue of neck, shoulders, chest and upper abdomen (an elliptic cylinder whose
    half-width grows from the neck to the chest)."""
    half_width = 55 + 112 * np.clip((v - 35) / 55, 0, 1) ** 0.7
    half_depth = 60 + 50 * np.clip((v - 35) / 55, 0, 1)
    return _MU_SOFT * half_depth * _chord((x / half_width) ** 2, 1.0)


def _xray_lungs(rng, x, v):
    """The two lung fields: ellipses cut by the diaphragm domes (right higher). Returns
    per-lung outlines (ellipses, before the dome cuts them), the total air path length per
    pixel, and the dome heights."""
    right_dome, left_dome = rng.uniform(245, 262), rng.uniform(258, 275)
    domes = {-1: right_dome, 1: left_dome}
    fields, path = {}, np.zeros(np.broadcast(x, v).shape)
    for side, dome_top in domes.items():
        cx, cv, ax, av = side * 85, 172, 62, 122
        rho = ((x - cx) / ax) ** 2 + ((v - cv) / av) ** 2
        dome = dome_top + 45 * ((x - side * 80) / 70) ** 2  # lowest at the costophrenic angle
        above = np.clip((dome - v) / 30, 0, 1)  # the lung thins over the dome
        fields[side] = rho < 1
        inside = (rho < 1) & (v < dome)
        path += np.where(inside, 2 * 80 * np.sqrt(np.clip(1 - rho, 0, 1)) * np.sqrt(above), 0)
    return fields, path, domes


def _xray_lung_markings(rng, x, v, lungs):
    """Vessels fanning out from each hilum and thinning towards the periphery."""
    out = np.zeros(np.broadcast(x, v).shape)
    for side in (-1, 1):
        segments: list = []
        for _ in range(6):
            angle = rng.uniform(-0.45, 0.45) * np.pi  # around the lateral direction
            _grow_branches_2d(rng, segments, (side * 45.0, 165.0), side, angle, 40.0, 3.5, 3)
        for (ax, av), (bx, bv), r in segments:
            dx, dv = bx - ax, bv - av
            u = np.clip(((x - ax) * dx + (v - av) * dv) / (dx * dx + dv * dv), 0, 1)
            dist2 = (x - ax - u * dx) ** 2 + (v - av - u * dv) ** 2
            out += (_MU_SOFT - _MU_LUNG) * _chord(dist2, r) * lungs[side]
    return out


def _grow_branches_2d(rng, out: list, start, side: int, angle: float, length: float,
                      radius: float, depth: int) -> None:
    end = (start[0] + side * length * np.cos(angle), start[1] + length * np.sin(angle))
    out.append((start, end, radius))
    if depth:
        for turn in (-1, 1):
            _grow_branches_2d(rng, out, end, side, angle + turn * rng.uniform(0.2, 0.5),
                              length * rng.uniform(0.7, 0.85), radius * 0.7, depth - 1)


def _xray_heart_shadow(rng, x, v, lung_path, *, enlarged: bool):
    """Path length (mm) of lung that the heart and aortic knob displace where they overlap the
    medial lung fields: this is what draws the cardiac silhouette."""
    grow = rng.uniform(1.35, 1.5) if enlarged else rng.uniform(0.95, 1.05)
    hx, hv = 18 + 12 * (grow - 1), 205 + 10 * (grow - 1)
    heart = _chord(((x - hx) / (58 * grow)) ** 2 + ((v - hv) / (58 * min(grow, 1.2))) ** 2, 1.0)
    knob = _chord(((x - 32) / 16) ** 2 + ((v - 112) / 16) ** 2, 1.0)
    return np.minimum(lung_path, 60 * heart + 18 * knob)


def _xray_effusion(rng, x, v, lungs, aerated, sides):
    """Fluid at one or both bases with a meniscus climbing the lateral chest wall: it
    replaces the aerated lung below its level and fills the costophrenic recess."""
    out = np.zeros(aerated.shape)
    for side in sides:
        level = rng.uniform(205, 235) - 40 * np.clip((side * x - 60) / 90, 0, 1) ** 1.5
        fill = np.clip((v - level) / 12, 0, 1) * lungs[side]
        out += (_MU_SOFT - _MU_LUNG) * fill * np.maximum(aerated, 45)
    return out


def _xray_bones(x, v):
    """Spine, posterior and anterior ribs, clavicles."""
    out = np.zeros(np.broadcast(x, v).shape)
    # Spine: a column of vertebrae with slightly lucent disc spaces.
    disc = 0.85 + 0.15 * (np.mod(v / 26, 1.0) > 0.18)
    out += _MU_BONE * 0.25 * _chord((x / 20) ** 2, 1.0) * 20 * disc
    ax = np.abs(x)
    for i in range(11):
        v0 = 62 + 21 * i
        # How far the rib reaches laterally at its height (follows the lung outline).
        reach = 20 + 135 * np.sqrt(np.clip(1 - ((v0 - 175) / 140) ** 2, 0, 1))
        t = np.clip((ax - 12) / (reach - 12), 0, 1)
        posterior = v0 - 10 * t + 32 * t ** 3
        on = (ax > 12) & (ax < reach)
        out += _MU_BONE * on * _chord((v - posterior) ** 2, 5.5)
        anterior = v0 + 32 + 48 * (1 - t)
        on_ant = (ax > 35) & (ax < reach) & (i < 8)
        out += 0.5 * _MU_BONE * on_ant * _chord((v - anterior) ** 2, 5.0)
    t = np.clip((ax - 20) / 125, 0, 1)
    clavicle = 78 - 22 * t + 6 * np.sin(2 * np.pi * t)
    out += _MU_BONE * ((ax > 20) & (ax < 150)) * _chord((v - clavicle) ** 2, 7.0)
    return out


def _xray_gastric_bubble(x, v, domes):
    """Air in the stomach under the left dome (a landmark for the left side)."""
    return _MU_SOFT * _chord(((x - 62) / 30) ** 2 + ((v - domes[1] - 32) / 18) ** 2, 1.0) * 14


def _xray_nodule(rng, x, v, ct: CtStudy | None):
    """A round opacity where the largest CT nodule projects (else anywhere in a lung field)."""
    if ct is not None and ct.nodules:
        n = max(ct.nodules, key=lambda n: n.diameter_mm)
        g = ct.geometry.grid
        frac = (n.z_mm - ct.geometry.z0) / max((g.slices - 1) * g.slice_mm, 1)
        # CT x (mm, + to the patient's left) → across the lung field, clear of the heart.
        side = 1.0 if n.x_mm > 0 else -1.0
        nx = side * (65 + 60 * float(np.clip((abs(n.x_mm) - 20) / 100, 0, 1)))
        nv = 255 - frac * 170  # CT slice fraction → height in the lung field
        diameter = max(n.diameter_mm * 1.1, 18.0)  # PA magnification
    else:
        nx, nv, diameter = rng.choice((-1, 1)) * rng.uniform(65, 115), rng.uniform(110, 210), 18.0
    r = diameter / 2
    # Denser than the physical value, so that an 18 mm nodule reads clearly over the ribs.
    return 3.0 * (_MU_SOFT - _MU_LUNG) * _chord((x - nx) ** 2 + (v - nv) ** 2, r)


# --- writing DICOM, NIfTI and CSV -------------------------------------------------------

class _StudyUids:
    """UIDs hashed from the seed and the patient's index: the same seed gives the same UIDs,
    another seed gives new ones. Both studies share nothing but the patient."""

    def __init__(self, seed: int, index: int):
        self._key = f"medzone-demo|{seed}|{index}"
        self.ct_study = self.uid("ct-study")
        self.ct_series = self.uid("ct-series")
        self.ct_frame = self.uid("ct-frame")
        self.cxr_study = self.uid("cxr-study")
        self.cxr_series = self.uid("cxr-series")
        self.cxr_instance = self.uid("cxr-instance")

    def uid(self, role: str) -> str:
        from pydicom.uid import generate_uid

        return str(generate_uid(entropy_srcs=[f"{self._key}|{role}"]))

    def ct_instance(self, number: int) -> str:
        return self.uid(f"ct-instance|{number}")


def _ds_number(value: float) -> str:
    """A DS string (≤ 16 characters) without float noise such as 1.2000000000000002."""
    return format(round(float(value), 4), ".10g")


def _hhmmss(rng, start_hour: int, end_hour: int) -> str:
    seconds = int(rng.integers(start_hour * 3600, end_hour * 3600))
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _add_minutes(tm: str, minutes: int) -> str:
    total = int(tm[:2]) * 3600 + int(tm[2:4]) * 60 + int(tm[4:6]) + minutes * 60
    total = min(total, 24 * 3600 - 1)
    return f"{total // 3600:02d}{total // 60 % 60:02d}{total % 60:02d}"


def _base_dataset(rng, ident: Identity, facts: ClinicalFacts, *, sop_class: str, modality: str,
                  study_uid: str, series_uid: str, accession: str, study_time: str,
                  study_description: str, series_description: str, station: str):
    """Patient, study, series and equipment attributes shared by every image of a study,
    with the fake identity spread the way hospital systems spread it."""
    from pydicom.dataset import Dataset

    day = f"{ident.visit_date:%Y%m%d}"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = day
    ds.StudyTime = study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _add_minutes(study_time, 2)
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = ident.institution
    ds.InstitutionAddress = ident.institution_address
    ds.ReferringPhysicianName = _DOCTORS[rng.integers(len(_DOCTORS))]
    ds.StationName = station
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PerformingPhysicianName = _DOCTORS[rng.integers(len(_DOCTORS))]
    ds.OperatorsName = _TECHNOLOGISTS[rng.integers(len(_TECHNOLOGISTS))]
    ds.ManufacturerModelName = f"Demo {modality}"
    ds.PatientName = ident.dicom_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = f"{ident.birth_date:%Y%m%d}"
    ds.PatientSex = ident.sex
    ds.OtherPatientIDs = ident.rrn
    ds.PatientAge = f"{ident.age:03d}Y"
    ds.PatientSize = _ds_number(facts.height_cm / 100)
    ds.PatientWeight = _ds_number(facts.weight_kg)
    ds.PatientAddress = ident.address
    ds.PatientTelephoneNumbers = ident.phone
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{rng.integers(0, 10**6):06d}"
    ds.SeriesNumber = 1 if modality != "CT" else 2
    ds.BurnedInAnnotation = "NO"
    # A vendor-style private block repeating the identity, as real scanners do.
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", ident.name)
    block.add_new(0x11, "LO", ident.rrn)
    block.add_new(0x12, "LT", f"Registered patient {ident.name_en} ({ident.patient_id}), "
                              f"tel {ident.phone}")
    return ds


def _with_file_meta(ds, sop_uid: str):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_uid
    return ds


def _identifying_comment(rng, ident: Identity, what: str) -> str:
    if ident.foreign or rng.random() < 0.5:
        return f"{what}: {ident.name_en}, tel {ident.phone}"
    return f"{ident.name} 님 {what} (연락처 {ident.phone})"


def write_ct_series(folder: Path, rng, ident: Identity, facts: ClinicalFacts, ct: CtStudy,
                    uids: _StudyUids) -> None:
    """One file per slice, 0001.dcm upwards; InstanceNumber equals the file number."""
    import pydicom
    from pydicom.uid import CTImageStorage

    folder.mkdir(parents=True, exist_ok=True)
    geom, g = ct.geometry, ct.geometry.grid
    ds = _base_dataset(rng, ident, facts, sop_class=CTImageStorage, modality="CT",
                       study_uid=uids.ct_study, series_uid=uids.ct_series,
                       accession=ident.accession_ct, study_time=_hhmmss(rng, 9, 17),
                       study_description="CT CHEST WITH CONTRAST",
                       series_description=f"AXIAL {g.slice_mm:g}mm STANDARD",
                       station=f"{ident.institution_code}-CT01")
    ds.FrameOfReferenceUID = uids.ct_frame
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.ContrastBolusAgent = "IOHEXOL 350"
    ds.KVP = "120"
    ds.XRayTubeCurrent = int(rng.integers(120, 260))
    ds.ConvolutionKernel = "STANDARD"
    ds.AcquisitionNumber = 1
    ds.SliceThickness = _ds_number(g.slice_mm)
    ds.SpacingBetweenSlices = _ds_number(g.slice_mm)
    ds.PixelSpacing = [_ds_number(g.pixel_mm), _ds_number(g.pixel_mm)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = g.rows, g.cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept = str(CT_RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]

    stored = ct_stored_values(ct.hu)
    # Technologists' free-text comment on the first slice, for some patients.
    comment = (_identifying_comment(rng, ident, "contrast CT, IV access right arm")
               if rng.random() < 0.5 else None)
    for k in range(g.slices):
        number = k + 1
        _with_file_meta(ds, uids.ct_instance(number))
        ds.InstanceNumber = number
        z = geom.slice_z(k)
        ds.ImagePositionPatient = [_ds_number(geom.x0), _ds_number(geom.y0), _ds_number(z)]
        ds.SliceLocation = _ds_number(z)
        if number == 1 and comment:
            ds.ImageComments = comment
        elif "ImageComments" in ds:
            del ds.ImageComments
        ds.PixelData = stored[k].tobytes()
        pydicom.dcmwrite(folder / f"{number:04d}.dcm", ds, enforce_file_format=True)


def write_chest_xray(path: Path, rng, ident: Identity, facts: ClinicalFacts, image: np.ndarray,
                     uids: _StudyUids, *, monochrome1: bool) -> None:
    """A single-frame CR or DX image. MONOCHROME1 images store inverted values, so that bone
    still displays bright once a viewer applies the inversion."""
    import pydicom
    from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

    path.parent.mkdir(parents=True, exist_ok=True)
    modality = "DX" if rng.random() < 0.5 else "CR"
    sop_class = (DigitalXRayImageStorageForPresentation if modality == "DX"
                 else ComputedRadiographyImageStorage)
    ds = _base_dataset(rng, ident, facts, sop_class=sop_class, modality=modality,
                       study_uid=uids.cxr_study, series_uid=uids.cxr_series,
                       accession=ident.accession_cxr, study_time=_hhmmss(rng, 8, 12),
                       study_description="CHEST PA", series_description="PA ERECT",
                       station=f"{ident.institution_code}-DR02")
    _with_file_meta(ds, uids.cxr_instance)
    spacing = _ds_number(CXR_FOV_MM / image.shape[0])
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # columns towards the patient's left, rows to the feet
    ds.KVP = "120"
    ds.DistanceSourceToDetector = "1800"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        # Sign -1: higher values mean less X-ray reached the detector (bone bright).
        ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    if rng.random() < 0.5:
        ds.ImageComments = _identifying_comment(rng, ident, "PA erect, portable not required")
    pixels = (CXR_MAX - image) if monochrome1 else image
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def write_nifti_mask(path: Path, ct: CtStudy) -> None:
    """The mask as NIfTI-1 (uint8, indexed [col, row, slice], RAS affine), gzip with mtime 0
    so that the same cohort gives the same bytes."""
    import nibabel as nib

    data = np.ascontiguousarray(ct.mask.transpose(2, 1, 0))
    img = nib.Nifti1Image(data, ct.geometry.nifti_affine())
    img.header.set_xyzt_units("mm")
    img.set_qform(ct.geometry.nifti_affine(), code=1)
    img.set_sform(ct.geometry.nifti_affine(), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _clinical_row(ident: Identity, facts: ClinicalFacts, nodule_count: int) -> dict:
    return {
        "patient_id": ident.patient_id, "name": ident.name, "name_en": ident.name_en,
        "rrn": ident.rrn, "birth_date": ident.birth_date.isoformat(), "phone": ident.phone,
        "address": ident.address, "institution": ident.institution,
        "accession_ct": ident.accession_ct, "accession_cxr": ident.accession_cxr,
        "age": ident.age, "sex": ident.sex, "height_cm": f"{facts.height_cm:.1f}",
        "weight_kg": f"{facts.weight_kg:.1f}", "smoking": facts.smoking,
        "pack_years": facts.pack_years, "cxr_label": facts.cxr_label,
        "ct_nodule_count": nodule_count, "visit_date": ident.visit_date.isoformat(),
        "notes": facts.notes,
    }


def _nodule_rows(ident: Identity, series_uid: str, ct: CtStudy) -> list[dict]:
    return [{
        "patient_id": ident.patient_id, "series_uid": series_uid, "nodule_id": n.nodule_id,
        "center_x_mm": _ds_number(n.x_mm), "center_y_mm": _ds_number(n.y_mm),
        "center_z_mm": _ds_number(n.z_mm), "center_col": n.col, "center_row": n.row,
        "center_slice": n.slice, "diameter_mm": f"{n.diameter_mm:.1f}",
        "volume_mm3": f"{n.volume_mm3:.1f}",
    } for n in ct.nodules]


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
