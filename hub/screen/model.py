"""What the export screen returns and how it is configured (documented defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

PASS, REVIEW, BLOCK = "pass", "review", "block"
_RANK = {PASS: 0, REVIEW: 1, BLOCK: 2}

PROFILES = ("acro-default", "opensafely")

# Rule names (the ``rule`` of a finding).
RULE_DATASET_IDENTIFIER = "dataset-identifier"
RULE_DIRECT_IDENTIFIER = "direct-identifier"
RULE_EMBEDDED_DATA = "embedded-data"
RULE_DATASET_IMAGE = "dataset-image"
RULE_ROW_LEVEL = "row-level-data"
RULE_SMALL_COUNTS = "small-counts"
RULE_MODEL_WEIGHTS = "model-weights"
RULE_FILE_TYPE = "file-type"
RULE_FILE_SIZE = "file-size"
RULE_MALFORMED = "malformed"
RULE_PATH = "path"
RULE_DOF = "degrees-of-freedom"
RULE_SURVIVAL = "survival-risk-set"
RULE_HISTOGRAM = "histogram-bins"
RULES = (RULE_DATASET_IDENTIFIER, RULE_DIRECT_IDENTIFIER, RULE_EMBEDDED_DATA, RULE_DATASET_IMAGE,
         RULE_ROW_LEVEL, RULE_SMALL_COUNTS, RULE_MODEL_WEIGHTS, RULE_FILE_TYPE, RULE_FILE_SIZE,
         RULE_MALFORMED, RULE_PATH, RULE_DOF, RULE_SURVIVAL, RULE_HISTOGRAM)

MB = 1024 * 1024


@dataclass(frozen=True)
class Finding:
    """One reason for a verdict. ``detail`` never repeats the identifying value itself."""

    rule: str
    severity: str  # "review" | "block"
    location: str
    detail: str


@dataclass
class FileVerdict:
    path: str
    verdict: str  # "pass" | "review" | "block"
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "verdict": self.verdict,
                "findings": [{"rule": f.rule, "severity": f.severity, "location": f.location,
                              "detail": f.detail} for f in self.findings]}


def worst(verdicts) -> str:
    out = PASS
    for v in verdicts:
        if _RANK[v] > _RANK[out]:
            out = v
    return out


@dataclass(frozen=True)
class ScreenConfig:
    """Every rule's setting. Defaults follow ACRO 1.0 (threshold 10, zeros disclosive,
    dominance n=2 k=0.9, p-ratio 0.1) and OpenSAFELY's output checking (16 MB files, 5000 CSV
    rows; with ``profile="opensafely"`` counts ≤7 are disclosive and counts must be rounded
    to 5)."""

    profile: str = "acro-default"
    # file type and size
    max_file_bytes: int = 16 * MB
    max_csv_rows: int = 5000
    max_output_bytes: int = 8 * MB  # one notebook output (all its mime bundles)
    # small counts
    threshold: int = 10  # acro-default: a count below it (1..threshold-1) is disclosive
    zeros_disclosive: bool = True
    dominance_n: int = 2
    dominance_k: float = 0.9
    p_ratio: float = 0.1
    # ACRO's other checks: a regression with fewer residual degrees of freedom than this
    # (safe_dof_threshold), a survival table with a risk set, or a change of the risk set
    # between two rows, below this (survival_safe_threshold); histogram bins use ``threshold``
    dof_threshold: int = 10
    survival_threshold: int = 10
    opensafely_redact_at_or_below: int = 7
    opensafely_rounding: int = 5
    # differencing across releases: two tables are compared (a total and the same total minus
    # a subgroup) when one lies within the other (no count larger in one and smaller in the
    # other) and their counts differ by at most this fraction of the larger
    differencing_max_fraction: float = 0.1
    # row-level data
    row_level_min_rows: int = 20  # a table at least this long …
    row_level_cohort_fraction: float = 0.5  # … and at least this share of the cohort
    # direct identifiers (recognizer confidence)
    block_confidence: float = 0.8
    review_confidence: float = 0.5
    # identifiers from the index: candidate spellings
    max_window_words: int = 4
    # archives
    max_archive_depth: int = 3
    max_archive_members: int = 10_000
    max_unpacked_bytes: int = 256 * MB
    max_compression_ratio: float = 200.0
    # embedded data in base64 strings of notebooks (shorter strings are not decoded)
    min_base64_chars: int = 64
    # bytes written as text (textbytes.py): base64/hex/bytes-repr runs that decode to nothing
    # the screen reads are reviewed from this many characters when their characters are at
    # least this random (entropy over the alphabet's maximum); a numeric dump of at least
    # this many values that matches no dataset image is reviewed; dumps are looked up as
    # images when both sides hold at least numeric_dump_min_side values (calibrated on
    # cohort seeds 1-3, see docs/screen.md)
    text_bytes_review_chars: int = 256
    text_bytes_min_randomness: float = 0.8
    numeric_dump_review_values: int = 4096
    numeric_dump_min_side: int = 16
    # image metadata: compressed PNG text (zTXt/iTXt) is decompressed up to this size
    max_metadata_bytes: int = 1 * MB
    # PNG tEXt chunks with these keywords and a short printable value are harmless
    # (matplotlib writes "Software"); any other text, EXIF or comment is a finding
    harmless_png_text_keys: tuple[str, ...] = ("Software", "Creation Time", "Title")
    # the file types that may leave (by content); anything else is a finding
    allowed_types: tuple[str, ...] = ("csv", "png", "jpeg", "svg", "html", "txt", "json",
                                      "ipynb", "md", "pdf")
    # images drawn inside a figure (panels, insets, montage tiles) compared per figure
    max_figure_regions: int = 24
    # … which block when their detail correlation with an indexed image is at most this
    # far below what confirms a bare copy, and are reviewed within the second leeway
    figure_block_leeway: float = 0.0
    figure_review_leeway: float = 0.02
    # a region of a colour figure: pixels farther than this (RGB distance, of 255) from
    # the colour its map gives their luminance (or from a rainbow or diverging map) are
    # laid over it (contour lines, a mask) and take their nearest neighbour's value before
    # the lookup when they form lines up to 4 pixels wide (a mask's blended area keeps its
    # pixels; at most a quarter of the region); None: looked up as drawn
    figure_overlay_tolerance: float | None = 64.0
    # a group of solid blocks filling less of its box than regions do (a body with air
    # around it) is still a region when an axes' frame is drawn around it and it fills at
    # least this share of its box
    figure_framed_min_fill: float = 0.25
    # image checks of one file in parallel (forked processes); findings keep their order
    workers: int = 0  # processes; 0: os.cpu_count(); 1: never a pool
    parallel_min_bytes: int = 2 * MB  # a file's images start a pool once they hold this much
    # identical image bytes met again in a request (a re-run cell, an output that is also an
    # attachment, the same figure in two files) reuse the first check's findings, reported
    # at each place; decides only the work, never a verdict
    dedupe_images: bool = True
    # a screening index of more than this many images finds a query's candidates with an
    # approximate nearest-neighbour search (then checked exactly, as every candidate is);
    # smaller ones compare the query with every image (same verdicts on the corpus, see
    # docs/screen.md "A screening index that scales")
    ann_min_images: int = 5000

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"unknown screen profile {self.profile!r} "
                             f"(one of {', '.join(PROFILES)})")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per CPU) or more, not {self.workers}")


class Collector:
    """Findings of one file, with helpers that keep locations consistent."""

    def __init__(self, config: ScreenConfig, indexes, depth: int = 0):
        self.config = config
        # an index applies the config's ann_min_images (the same object when it has it)
        self.indexes = [ix.configured(config) if hasattr(ix, "configured") else ix
                        for ix in indexes]
        self.depth = depth
        self.findings: list[Finding] = []
        self._seen: set[tuple[str, str, str]] = set()

    def add(self, rule: str, severity: str, location: str, detail: str) -> None:
        key = (rule, location, detail)
        if key not in self._seen:
            self._seen.add(key)
            self.findings.append(Finding(rule, severity, location, detail))

    def splice(self, inserts) -> None:
        """Put findings made elsewhere (image checks in other processes) where they would
        have been added: ``inserts`` is ``(len(findings) at that moment, [Finding…])`` in
        the order they were met. Duplicates are dropped as :meth:`add` drops them."""
        merged: list[Finding] = []
        done = 0
        for position, found in inserts:
            merged += self.findings[done:position]
            merged += found
            done = position
        merged += self.findings[done:]
        self.findings, self._seen = [], set()
        for f in merged:
            self.add(f.rule, f.severity, f.location, f.detail)

    def truncate(self, position: int) -> None:
        """Forget findings from ``position`` on (what came after a failure)."""
        for f in self.findings[position:]:
            self._seen.discard((f.rule, f.location, f.detail))
        del self.findings[position:]

    @property
    def cohort_size(self) -> int:
        return max((int(ix.counts.get("patient_id", 0) or 0) for ix in self.indexes), default=0)
